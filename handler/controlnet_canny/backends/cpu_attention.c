// Multi-head attention for x86-64 CPUs with AVX-512: out = softmax(q k^T * scale) v, in bf16 (with
// AVX-512 BF16) and fp32.
//
// Built and loaded by cpu_attention.py. Same arithmetic as torch's CPU flash-attention kernel: q.k in
// fp32, softmax in fp32, the product with v accumulated in fp32; in bf16 the probabilities are rounded to
// bf16 for that product and the output to bf16, as torch does. What differs: bf16 products run on
// VDPBF16PS (two bf16 products added into an fp32 lane), which torch's kernel uses only with AMX, and
// both types run register-blocked tiles sized for head dims of 40-160 instead of generic GEMM calls.
//
// Per (batch, head): keys and values are repacked into the layout the tiles read, then each block of
// ROW_BLOCK query rows gets its full score rows (exact softmax, no online rescaling), and their
// probabilities times v. cpu_attention_kernel.h holds that code once; it is instantiated below per type.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROW_BLOCK 24     // query rows per block: their fp32 scores for 4096 keys (384 KiB) stay in L2
#define QK_ROWS 6        // query rows per q.k tile
#define PV_STEPS 128     // key steps per p.v pass: their values stay in L1
#define MAX_VECTORS 10   // head dim up to 160

typedef uint16_t bf16;

// e^x for x <= 0: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its degree-6 Taylor
// polynomial (relative error below 2e-7, under fp32's half ulp of the sum it feeds).
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 is fp32's smallest normal; below it 2^n underflows
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: exact n * hi
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// Every lane gets the 32 bits at `p`: one fp32 element, or a pair of bf16 ones.
static inline __m512i broadcast32(const void *p) {
    int32_t bits;
    memcpy(&bits, p, sizeof bits);
    return _mm512_set1_epi32(bits);
}

static inline bf16 round_to_bf16(float f) {  // to nearest even, as VCVTNE2PS2BF16 does
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (bf16)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

typedef struct {
    int64_t queries, keys, dim, key_groups, padded_keys, vectors;
} shape_t;

// Per type: ELEM, the elements one 32-bit lane holds in a product step (LANE), the step itself (DOT: acc +=
// the lane-wise dot products of a and b), how probabilities are stored and how outputs are rounded.
#pragma GCC push_options
#pragma GCC target("avx512bf16")  // only here: the fp32 kernel runs on AVX-512 CPUs without it

#define ELEM bf16
#define SUFFIX bf16
#define LANE 2
#define DOT(acc, a, b) _mm512_dpbf16_ps(acc, (__m512bh)(a), (__m512bh)(b))
#define STORE_PROBS(dst, e0, e1) _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(e1, e0))
#define FROM_FLOAT(f) round_to_bf16(f)
#include "cpu_attention_kernel.h"
#undef ELEM
#undef SUFFIX
#undef LANE
#undef DOT
#undef STORE_PROBS
#undef FROM_FLOAT
#pragma GCC pop_options

#define ELEM float
#define SUFFIX fp32
#define LANE 1
#define DOT(acc, a, b) _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
#define STORE_PROBS(dst, e0, e1) (_mm512_storeu_ps(dst, e0), _mm512_storeu_ps((dst) + 16, e1))
#define FROM_FLOAT(f) (f)
#include "cpu_attention_kernel.h"

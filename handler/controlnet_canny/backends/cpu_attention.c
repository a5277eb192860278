// Multi-head attention for x86-64 CPUs: out = softmax(q k^T * scale) v. Built once per instruction set
// by cpu_attention.py, which passes only that set's compiler flags, so each library loads on any CPU that
// has its set:
//   -mavx512f ... : fp32, and bf16 (its code alone is compiled for AVX-512 BF16, which the CPU must have)
//   -mavx2 -mfma  : fp32
//
// Same arithmetic as torch's CPU flash-attention kernel: q.k in fp32, softmax in fp32, the product with v
// accumulated in fp32; in bf16 the probabilities are rounded to bf16 for that product and the output to
// bf16, as torch does. What differs: bf16 products run on VDPBF16PS (two bf16 products added into an fp32
// lane), which torch's kernel uses only with AMX, and both types run register-blocked tiles sized for head
// dims of 40-160 instead of generic GEMM calls.
//
// Per (batch, head): keys and values are repacked into the layout the tiles read, then each block of
// ROW_BLOCK query rows gets its full score rows (exact softmax, no online rescaling), and their
// probabilities times v. cpu_attention_kernel.h holds that code once, written against the small vector
// interface below (`vec`: WIDTH fp32 lanes); it is instantiated per element type at the end.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROW_BLOCK 24      // query rows per block: their fp32 scores for 4096 keys (384 KiB) stay in L2
#define PV_STEPS 128      // key steps per p.v pass: their values stay in L1
#define MAX_HEAD_DIM 160

// Tiles per instruction set, sized so that accumulators + loaded vectors + 1 broadcast fill the registers:
//   QK_ROWS x QK_GROUPS accumulators of q.k (QK_GROUPS key vectors loaded per step);
//   PV_TILE_SHAPES: X(vectors, rows) for p.v tiles covering that many output vectors of `rows` rows.
#if defined(__AVX512F__)
// 32 registers. q.k: 6 x 4 + 4 + 1 = 29 (64 keys). p.v: a head's full width (up to 10 vectors) per tile.
#define WIDTH 16
#define QK_ROWS 6
#define QK_GROUPS 4
#define PV_MAX_VECTORS 10
#define PV_TILE_SHAPES(X) X(1, 8) X(2, 8) X(3, 8) X(4, 6) X(5, 4) X(6, 4) X(7, 3) X(8, 3) X(9, 2) X(10, 2)
typedef __m512 vec;
typedef __m512i vbits;  // 32-bit lanes as loaded: an fp32 element or a pair of bf16 ones
static inline vec v_zero(void) { return _mm512_setzero_ps(); }
static inline vec v_set(float f) { return _mm512_set1_ps(f); }
static inline vec v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vec x) { _mm512_storeu_ps(p, x); }
static inline vbits v_load_bits(const void *p) { return _mm512_loadu_si512(p); }
static inline vbits v_set_bits(int32_t bits) { return _mm512_set1_epi32(bits); }
static inline vec v_from_bits(vbits x) { return _mm512_castsi512_ps(x); }
static inline vec v_add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec v_max(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec v_fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
static inline vec v_fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
static inline vec v_round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_times_pow2(vec x, vec n) { return _mm512_scalef_ps(x, n); }  // x 2^n, n integral
static inline float v_reduce_max(vec x) { return _mm512_reduce_max_ps(x); }
static inline float v_reduce_add(vec x) { return _mm512_reduce_add_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
// 16 registers. q.k: 6 x 2 + 2 + 1 = 15 (16 keys; key counts are padded to 16, so no tail tiles). p.v:
// head dims of 40-160 are 5-20 vectors, more accumulators than registers, so a tile covers 1-3 of them
// (8 x 1, 6 x 2, 4 x 3) and a head's width is split into near-equal parts of at most 3.
#define WIDTH 8
#define QK_ROWS 6
#define QK_GROUPS 2
#define PV_MAX_VECTORS 3
#define PV_TILE_SHAPES(X) X(1, 8) X(2, 6) X(3, 4)
typedef __m256 vec;
typedef __m256i vbits;
static inline vec v_zero(void) { return _mm256_setzero_ps(); }
static inline vec v_set(float f) { return _mm256_set1_ps(f); }
static inline vec v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vec x) { _mm256_storeu_ps(p, x); }
static inline vbits v_load_bits(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vbits v_set_bits(int32_t bits) { return _mm256_set1_epi32(bits); }
static inline vec v_from_bits(vbits x) { return _mm256_castsi256_ps(x); }
static inline vec v_add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec v_max(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec v_fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec v_fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vec v_round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Only called with n in [-126, 0] (see exp_nonpositive): 2^n is the normal float with exponent bits n + 127.
static inline vec v_times_pow2(vec x, vec n) {
    const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
}
static inline float v_reduce_max(vec x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline float v_reduce_add(vec x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "build with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma, or with -mavx2 -mfma"
#endif

typedef uint16_t bf16;

// e^x for x <= 0: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its degree-6 Taylor
// polynomial (relative error below 2e-7, under fp32's half ulp of the sum it feeds).
static inline vec exp_nonpositive(vec x) {
    x = v_max(x, v_set(-87.0f));  // e^-87 is fp32's smallest normal; below it 2^n underflows (n >= -126)
    const vec n = v_round(v_mul(x, v_set(1.44269504088896341f)));
    vec r = v_fnmadd(n, v_set(0.693145751953125f), x);  // ln 2 in two parts: exact n * hi
    r = v_fnmadd(n, v_set(1.428606765330187e-06f), r);
    vec p = v_set(1.0f / 720);
    p = v_fmadd(p, r, v_set(1.0f / 120));
    p = v_fmadd(p, r, v_set(1.0f / 24));
    p = v_fmadd(p, r, v_set(1.0f / 6));
    p = v_fmadd(p, r, v_set(0.5f));
    p = v_fmadd(p, r, v_set(1.0f));
    p = v_fmadd(p, r, v_set(1.0f));
    return v_times_pow2(p, n);
}

// Every lane gets the 32 bits at `p`: one fp32 element, or a pair of bf16 ones.
static inline vbits broadcast32(const void *p) {
    int32_t bits;
    memcpy(&bits, p, sizeof bits);
    return v_set_bits(bits);
}

typedef struct {
    int64_t queries, keys, dim, key_groups, padded_keys, vectors;
} shape_t;

// Per type: ELEM, the elements one 32-bit lane holds in a product step (LANE), the step itself (DOT: acc +=
// the lane-wise dot products of a and b), how probabilities are stored and how outputs are rounded.
#if defined(__AVX512F__)
static inline bf16 round_to_bf16(float f) {  // to nearest even, as VCVTNE2PS2BF16 does
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (bf16)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

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
#endif

#define ELEM float
#define SUFFIX fp32
#define LANE 1
#define DOT(acc, a, b) v_fmadd(v_from_bits(a), v_from_bits(b), acc)
#define STORE_PROBS(dst, e0, e1) (v_store(dst, e0), v_store((dst) + WIDTH, e1))
#define FROM_FLOAT(f) (f)
#include "cpu_attention_kernel.h"

// Multi-head attention in bf16 for x86-64 CPUs with AVX-512 BF16: out = softmax(q k^T * scale) v.
//
// Built and loaded by cpu_attention.py. Same arithmetic as torch's CPU flash-attention kernel: q.k in
// fp32, softmax in fp32, probabilities rounded to bf16 for the product with v, accumulated in fp32, output
// rounded to bf16. What differs is the instruction doing the products: VDPBF16PS (two bf16 products added
// into an fp32 lane), which torch's kernel does not use without AMX.
//
// Per (batch, head): keys and values are repacked into the pair-interleaved layout VDPBF16PS reads, then
// each block of ROW_BLOCK query rows gets its full score rows (exact softmax, no online rescaling), and
// their probabilities times v.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROW_BLOCK 24     // query rows per block: their fp32 scores for 4096 keys (384 KiB) stay in L2
#define QK_ROWS 6        // query rows per q.k tile
#define PV_PAIRS 128     // key pairs per p.v pass: 128 x dim bf16 values stay in L1
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

static inline __m512bh broadcast_pair(const bf16 *pair) {
    int32_t bits;
    memcpy(&bits, pair, sizeof bits);
    return (__m512bh)_mm512_set1_epi32(bits);
}

// scores[r][j] = q[r] . k[j] for up to QK_ROWS rows and G 16-key groups. `keys`: groups of
// [dim / 2][16][2] (group_stride elements apart): lane j of one vector holds k[j][2i], k[j][2i + 1].
#define QK_TILE(G)                                                                                           \
    static inline void qk_tile_##G(const bf16 *q, int64_t q_stride, int rows, const bf16 *keys,            \
                                   int64_t group_stride, int64_t pairs, float *scores, int64_t scores_stride) { \
        __m512 acc[QK_ROWS][G];                                                                            \
        for (int r = 0; r < QK_ROWS; r++)                                                                  \
            for (int c = 0; c < G; c++) acc[r][c] = _mm512_setzero_ps();                                   \
        for (int64_t i = 0; i < pairs; i++) {                                                              \
            __m512bh key[G];                                                                               \
            for (int c = 0; c < G; c++) key[c] = (__m512bh)_mm512_loadu_si512(keys + c * group_stride + i * 32); \
            for (int r = 0; r < QK_ROWS && r < rows; r++) {                                               \
                const __m512bh query = broadcast_pair(q + r * q_stride + 2 * i);                           \
                for (int c = 0; c < G; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], query, key[c]);        \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int c = 0; c < G; c++) _mm512_storeu_ps(scores + r * scores_stride + 16 * c, acc[r][c]);  \
    }
QK_TILE(4)  // 64 keys: 6 x 4 accumulators + 4 key vectors + 1 broadcast in 32 registers
QK_TILE(1)  // the last 16-key groups (77 text tokens: 64 + 16, not 128)

// out[r] += sum over key pairs [begin, end) of p[r][j] v[j], for `rows` <= R rows of NV * 16 fp32 lanes.
// `values`: [pair][NV * 16][2], lane d holding v[2j][d], v[2j + 1][d]; `probs` rows: bf16, key order.
#define PV_TILE(NV, R)                                                                                       \
    static void pv_tile_##NV(const bf16 *probs, int64_t probs_stride, int rows, const bf16 *values,        \
                             int64_t begin, int64_t end, float *out) {                                     \
        __m512 acc[R][NV];                                                                                 \
        for (int r = 0; r < R; r++)                                                                        \
            for (int z = 0; z < NV; z++)                                                                   \
                acc[r][z] = r < rows ? _mm512_loadu_ps(out + (r * NV + z) * 16) : _mm512_setzero_ps();     \
        for (int64_t j = begin; j < end; j++) {                                                            \
            __m512bh value[NV];                                                                            \
            for (int z = 0; z < NV; z++) value[z] = (__m512bh)_mm512_loadu_si512(values + (j * NV + z) * 32); \
            for (int r = 0; r < R && r < rows; r++) {                                                      \
                const __m512bh p = broadcast_pair(probs + r * probs_stride + 2 * j);                       \
                for (int z = 0; z < NV; z++) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], p, value[z]);         \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int z = 0; z < NV; z++) _mm512_storeu_ps(out + (r * NV + z) * 16, acc[r][z]);             \
    }

// Rows per tile: as many as keep R * NV accumulators + NV value vectors + 1 broadcast in 32 registers.
PV_TILE(1, 8) PV_TILE(2, 8) PV_TILE(3, 8) PV_TILE(4, 6) PV_TILE(5, 4)
PV_TILE(6, 4) PV_TILE(7, 3) PV_TILE(8, 3) PV_TILE(9, 2) PV_TILE(10, 2)

typedef void (*pv_tile_fn)(const bf16 *, int64_t, int, const bf16 *, int64_t, int64_t, float *);
static const pv_tile_fn PV_TILES[MAX_VECTORS + 1] = {
    NULL, pv_tile_1, pv_tile_2, pv_tile_3, pv_tile_4, pv_tile_5, pv_tile_6, pv_tile_7, pv_tile_8, pv_tile_9, pv_tile_10,
};
static const int PV_ROWS[MAX_VECTORS + 1] = {0, 8, 8, 8, 6, 4, 4, 3, 3, 2, 2};

static inline bf16 round_to_bf16(float f) {  // to nearest even, as VCVTNE2PS2BF16 does
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (bf16)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

typedef struct {
    int64_t queries, keys, dim, key_groups, padded_keys, vectors;
} shape_t;

typedef struct {
    bf16 *keys, *values, *probs;
    float *scores, *acc;
} workspace_t;

static void attend_head(const shape_t *s, const bf16 *q, int64_t q_stride, const bf16 *k, int64_t k_stride,
                        const bf16 *v, int64_t v_stride, bf16 *out, int64_t out_stride, float scale,
                        const workspace_t *w) {
    const int64_t pairs = s->dim / 2, group_stride = 16 * s->dim, value_pairs = s->padded_keys / 2;
    const int64_t width = s->vectors * 16, np = s->padded_keys;
    // Padding keys get zero keys and values: their scores are masked below and their values add nothing.
    memset(w->keys, 0, s->key_groups * group_stride * sizeof(bf16));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t i = 0; i < pairs; i++)
            memcpy(w->keys + (j / 16) * group_stride + i * 32 + (j % 16) * 2, k + j * k_stride + 2 * i, 2 * sizeof(bf16));
    memset(w->values, 0, value_pairs * width * 2 * sizeof(bf16));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t d = 0; d < s->dim; d++) w->values[((j / 2) * width + d) * 2 + j % 2] = v[j * v_stride + d];

    const pv_tile_fn pv_tile = PV_TILES[s->vectors];
    const int pv_rows = PV_ROWS[s->vectors];
    for (int64_t row0 = 0; row0 < s->queries; row0 += ROW_BLOCK) {
        const int rows = s->queries - row0 < ROW_BLOCK ? (int)(s->queries - row0) : ROW_BLOCK;
        // Key tiles outer, rows inner: a tile's keys (5 KiB at dim 40) are read from L1 by every row.
        for (int64_t g = 0; g < s->key_groups;) {
            const int groups = s->key_groups - g >= 4 ? 4 : 1;
            for (int r = 0; r < rows; r += QK_ROWS)
                (groups == 4 ? qk_tile_4 : qk_tile_1)(q + (row0 + r) * q_stride, q_stride, rows - r < QK_ROWS ? rows - r : QK_ROWS,
                                                       w->keys + g * group_stride, group_stride, pairs,
                                                       w->scores + r * np + g * 16, np);
            g += groups;
        }
        float inv_sum[ROW_BLOCK];
        const __m512 scale_v = _mm512_set1_ps(scale);
        for (int r = 0; r < rows; r++) {
            float *score = w->scores + r * np;
            for (int64_t j = s->keys; j < np; j++) score[j] = -INFINITY;
            __m512 max = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < np; j += 16) max = _mm512_max_ps(max, _mm512_loadu_ps(score + j));
            // (s - max) * scale: scale > 0, so the max of the scaled scores is the scaled max.
            const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            bf16 *prob = w->probs + r * np;
            for (int64_t j = 0; j < np; j += 32) {
                const __m512 e0 = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(score + j), row_max), scale_v));
                const __m512 e1 = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(score + j + 16), row_max), scale_v));
                sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                _mm512_storeu_si512(prob + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        memset(w->acc, 0, (size_t)ROW_BLOCK * width * sizeof(float));
        for (int64_t j0 = 0; j0 < value_pairs; j0 += PV_PAIRS) {
            const int64_t j1 = j0 + PV_PAIRS < value_pairs ? j0 + PV_PAIRS : value_pairs;
            for (int r = 0; r < rows; r += pv_rows)
                pv_tile(w->probs + r * np, np, rows - r < pv_rows ? rows - r : pv_rows, w->values, j0, j1, w->acc + r * width);
        }
        for (int r = 0; r < rows; r++)
            for (int64_t d = 0; d < s->dim; d++)
                out[(row0 + r) * out_stride + d] = round_to_bf16(w->acc[r * width + d] * inv_sum[r]);
    }
}

// Tensors are [batch][tokens][heads * dim] with any batch and token strides (elements); head h starts h * dim
// elements into a token. The heads are shared among OpenMP threads: torch's own pool, as this library
// links the libgomp that torch has loaded (a second pool would compete with torch's spinning threads).
// Returns 0; 1 when out of memory; 2 for a head dim it does not take.
int attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t batch, int64_t heads,
                   int64_t queries, int64_t keys, int64_t dim, const int64_t *q_strides, const int64_t *k_strides,
                   const int64_t *v_strides, const int64_t *out_strides, float scale) {
    if (dim < 2 || dim % 2 || dim > 16 * MAX_VECTORS) return 2;
    shape_t s = {queries, keys, dim, (keys + 31) / 32 * 2, 0, (dim + 15) / 16};  // 32-key multiples: the softmax converts vector pairs
    s.padded_keys = s.key_groups * 16;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        workspace_t w = {
            aligned_alloc(64, s.key_groups * 16 * dim * sizeof(bf16)),
            aligned_alloc(64, s.padded_keys * s.vectors * 16 * sizeof(bf16)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(bf16)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(float)),
            aligned_alloc(64, ROW_BLOCK * s.vectors * 16 * sizeof(float)),
        };
        failed = !(w.keys && w.values && w.probs && w.scores && w.acc);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < batch * heads; u++) {
            if (failed) continue;
            const int64_t b = u / heads, h = u % heads;
            attend_head(&s, q + b * q_strides[0] + h * dim, q_strides[1], k + b * k_strides[0] + h * dim,
                        k_strides[1], v + b * v_strides[0] + h * dim, v_strides[1],
                        out + b * out_strides[0] + h * dim, out_strides[1], scale, &w);
        }
        free(w.keys); free(w.values); free(w.probs); free(w.scores); free(w.acc);
    }
    return failed;
}

// The attention kernel for one element type; cpu_attention.c includes it once per type (see there).
#define PASTE_(name, suffix) name##_##suffix
#define PASTE(name, suffix) PASTE_(name, suffix)
#define FN(name) PASTE(name, SUFFIX)

// scores[r][j] = q[r] . k[j] for up to QK_ROWS rows and G 16-key groups. `keys`: groups of
// [dim / LANE][16][LANE] (group_stride elements apart): lane j of one vector holds step i of key j.
#define QK_TILE(G)                                                                                           \
    static inline void FN(qk_tile_##G)(const ELEM *q, int64_t q_stride, int rows, const ELEM *keys,         \
                                       int64_t group_stride, int64_t steps, float *scores, int64_t scores_stride) { \
        __m512 acc[QK_ROWS][G];                                                                            \
        for (int r = 0; r < QK_ROWS; r++)                                                                  \
            for (int c = 0; c < G; c++) acc[r][c] = _mm512_setzero_ps();                                   \
        for (int64_t i = 0; i < steps; i++) {                                                              \
            __m512i key[G];                                                                                \
            for (int c = 0; c < G; c++) key[c] = _mm512_loadu_si512(keys + c * group_stride + i * 16 * LANE); \
            for (int r = 0; r < QK_ROWS && r < rows; r++) {                                               \
                const __m512i query = broadcast32(q + r * q_stride + LANE * i);                            \
                for (int c = 0; c < G; c++) acc[r][c] = DOT(acc[r][c], query, key[c]);                     \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int c = 0; c < G; c++) _mm512_storeu_ps(scores + r * scores_stride + 16 * c, acc[r][c]);  \
    }
QK_TILE(4)  // 64 keys: 6 x 4 accumulators + 4 key vectors + 1 broadcast in 32 registers
QK_TILE(1)  // the last 16-key groups (77 text tokens: 64 + 32, not 128)
#undef QK_TILE

// out[r] += sum over key steps [begin, end) of p[r][j] v[j], for `rows` <= R rows of NV * 16 fp32 lanes.
// `values`: [step][NV * 16][LANE], lane d holding v[LANE * j ...][d]; `probs` rows: key order.
#define PV_TILE(NV, R)                                                                                       \
    static void FN(pv_tile_##NV)(const ELEM *probs, int64_t probs_stride, int rows, const ELEM *values,    \
                                 int64_t begin, int64_t end, float *out) {                                 \
        __m512 acc[R][NV];                                                                                 \
        for (int r = 0; r < R; r++)                                                                        \
            for (int z = 0; z < NV; z++)                                                                   \
                acc[r][z] = r < rows ? _mm512_loadu_ps(out + (r * NV + z) * 16) : _mm512_setzero_ps();     \
        for (int64_t j = begin; j < end; j++) {                                                            \
            __m512i value[NV];                                                                             \
            for (int z = 0; z < NV; z++) value[z] = _mm512_loadu_si512(values + (j * NV + z) * 16 * LANE);  \
            for (int r = 0; r < R && r < rows; r++) {                                                      \
                const __m512i p = broadcast32(probs + r * probs_stride + LANE * j);                        \
                for (int z = 0; z < NV; z++) acc[r][z] = DOT(acc[r][z], p, value[z]);                      \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int z = 0; z < NV; z++) _mm512_storeu_ps(out + (r * NV + z) * 16, acc[r][z]);             \
    }

// Rows per tile: as many as keep R * NV accumulators + NV value vectors + 1 broadcast in 32 registers.
PV_TILE(1, 8) PV_TILE(2, 8) PV_TILE(3, 8) PV_TILE(4, 6) PV_TILE(5, 4)
PV_TILE(6, 4) PV_TILE(7, 3) PV_TILE(8, 3) PV_TILE(9, 2) PV_TILE(10, 2)
#undef PV_TILE

static void (*const FN(PV_TILES)[MAX_VECTORS + 1])(const ELEM *, int64_t, int, const ELEM *, int64_t, int64_t, float *) = {
    NULL, FN(pv_tile_1), FN(pv_tile_2), FN(pv_tile_3), FN(pv_tile_4), FN(pv_tile_5),
    FN(pv_tile_6), FN(pv_tile_7), FN(pv_tile_8), FN(pv_tile_9), FN(pv_tile_10),
};
static const int FN(PV_ROWS)[MAX_VECTORS + 1] = {0, 8, 8, 8, 6, 4, 4, 3, 3, 2, 2};

typedef struct {
    ELEM *keys, *values, *probs;
    float *scores, *acc;
} FN(workspace_t);

static void FN(attend_head)(const shape_t *s, const ELEM *q, int64_t q_stride, const ELEM *k, int64_t k_stride,
                            const ELEM *v, int64_t v_stride, ELEM *out, int64_t out_stride, float scale,
                            const FN(workspace_t) *w) {
    const int64_t steps = s->dim / LANE, group_stride = 16 * s->dim, value_steps = s->padded_keys / LANE;
    const int64_t width = s->vectors * 16, np = s->padded_keys;
    // Padding keys get zero keys and values: their scores are masked below and their values add nothing.
    memset(w->keys, 0, s->key_groups * group_stride * sizeof(ELEM));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t i = 0; i < steps; i++)
            memcpy(w->keys + (j / 16) * group_stride + (i * 16 + j % 16) * LANE, k + j * k_stride + LANE * i,
                   LANE * sizeof(ELEM));
    memset(w->values, 0, value_steps * width * LANE * sizeof(ELEM));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t d = 0; d < s->dim; d++) w->values[((j / LANE) * width + d) * LANE + j % LANE] = v[j * v_stride + d];

    void (*const pv_tile)(const ELEM *, int64_t, int, const ELEM *, int64_t, int64_t, float *) = FN(PV_TILES)[s->vectors];
    const int pv_rows = FN(PV_ROWS)[s->vectors];
    const __m512 scale_v = _mm512_set1_ps(scale);
    for (int64_t row0 = 0; row0 < s->queries; row0 += ROW_BLOCK) {
        const int rows = s->queries - row0 < ROW_BLOCK ? (int)(s->queries - row0) : ROW_BLOCK;
        // Key tiles outer, rows inner: a tile's keys (5-10 KiB at dim 40) are read from L1 by every row.
        for (int64_t g = 0; g < s->key_groups;) {
            const int groups = s->key_groups - g >= 4 ? 4 : 1;
            for (int r = 0; r < rows; r += QK_ROWS)
                (groups == 4 ? FN(qk_tile_4) : FN(qk_tile_1))(
                    q + (row0 + r) * q_stride, q_stride, rows - r < QK_ROWS ? rows - r : QK_ROWS,
                    w->keys + g * group_stride, group_stride, steps, w->scores + r * np + g * 16, np);
            g += groups;
        }
        float inv_sum[ROW_BLOCK];
        for (int r = 0; r < rows; r++) {
            float *score = w->scores + r * np;
            for (int64_t j = s->keys; j < np; j++) score[j] = -INFINITY;
            __m512 max = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < np; j += 16) max = _mm512_max_ps(max, _mm512_loadu_ps(score + j));
            // (s - max) * scale: scale > 0, so the max of the scaled scores is the scaled max.
            const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            ELEM *prob = w->probs + r * np;
            for (int64_t j = 0; j < np; j += 32) {
                const __m512 e0 = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(score + j), row_max), scale_v));
                const __m512 e1 = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(score + j + 16), row_max), scale_v));
                sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                STORE_PROBS(prob + j, e0, e1);
            }
            inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        memset(w->acc, 0, (size_t)ROW_BLOCK * width * sizeof(float));
        for (int64_t j0 = 0; j0 < value_steps; j0 += PV_STEPS) {
            const int64_t j1 = j0 + PV_STEPS < value_steps ? j0 + PV_STEPS : value_steps;
            for (int r = 0; r < rows; r += pv_rows)
                pv_tile(w->probs + r * np, np, rows - r < pv_rows ? rows - r : pv_rows, w->values, j0, j1, w->acc + r * width);
        }
        for (int r = 0; r < rows; r++)
            for (int64_t d = 0; d < s->dim; d++)
                out[(row0 + r) * out_stride + d] = FROM_FLOAT(w->acc[r * width + d] * inv_sum[r]);
    }
}

// Tensors are [batch][tokens][heads * dim] with any batch and token strides (elements); head h starts h * dim
// elements into a token. The heads are shared among `threads` OpenMP threads: torch's own pool, as this
// library links the libgomp that torch has loaded (a second pool would compete with torch's spinning
// threads). Returns 0; 1 when out of memory; 2 for a head dim it does not take.
int FN(attention)(const ELEM *q, const ELEM *k, const ELEM *v, ELEM *out, int64_t batch, int64_t heads,
                  int64_t queries, int64_t keys, int64_t dim, const int64_t *q_strides, const int64_t *k_strides,
                  const int64_t *v_strides, const int64_t *out_strides, float scale, int threads) {
    if (dim < LANE || dim % LANE || dim > 16 * MAX_VECTORS) return 2;
    // 32-key multiples: the softmax writes probabilities two vectors at a time.
    shape_t s = {queries, keys, dim, (keys + 31) / 32 * 2, 0, (dim + 15) / 16};
    s.padded_keys = s.key_groups * 16;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        FN(workspace_t) w = {
            aligned_alloc(64, s.key_groups * 16 * dim * sizeof(ELEM)),
            aligned_alloc(64, s.padded_keys * s.vectors * 16 * sizeof(ELEM)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(ELEM)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(float)),
            aligned_alloc(64, ROW_BLOCK * s.vectors * 16 * sizeof(float)),
        };
        failed = !(w.keys && w.values && w.probs && w.scores && w.acc);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < batch * heads; u++) {
            if (failed) continue;
            const int64_t b = u / heads, h = u % heads;
            FN(attend_head)(&s, q + b * q_strides[0] + h * dim, q_strides[1], k + b * k_strides[0] + h * dim,
                            k_strides[1], v + b * v_strides[0] + h * dim, v_strides[1],
                            out + b * out_strides[0] + h * dim, out_strides[1], scale, &w);
        }
        free(w.keys); free(w.values); free(w.probs); free(w.scores); free(w.acc);
    }
    return failed;
}

#undef FN
#undef PASTE
#undef PASTE_

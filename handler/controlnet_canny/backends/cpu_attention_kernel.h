// The attention kernel for one element type, written against cpu_attention.c's vector interface (`vec` of
// WIDTH fp32 lanes, v_* operations, the tile sizes of its instruction set); included once per type there.
#define PASTE_(name, suffix) name##_##suffix
#define PASTE(name, suffix) PASTE_(name, suffix)
#define FN(name) PASTE(name, SUFFIX)

// scores[r][j] = q[r] . k[j] for up to QK_ROWS rows and G WIDTH-key groups. `keys`: groups of
// [dim / LANE][WIDTH][LANE] (group_stride elements apart): lane j of one vector holds step i of key j.
#define QK_TILE(name, G)                                                                                     \
    static inline void FN(name)(const ELEM *q, int64_t q_stride, int rows, const ELEM *keys,                \
                                int64_t group_stride, int64_t steps, float *scores, int64_t scores_stride) { \
        vec acc[QK_ROWS][G];                                                                               \
        for (int r = 0; r < QK_ROWS; r++)                                                                  \
            for (int c = 0; c < G; c++) acc[r][c] = v_zero();                                              \
        for (int64_t i = 0; i < steps; i++) {                                                              \
            vbits key[G];                                                                                  \
            for (int c = 0; c < G; c++) key[c] = v_load_bits(keys + c * group_stride + i * WIDTH * LANE);  \
            for (int r = 0; r < QK_ROWS && r < rows; r++) {                                               \
                const vbits query = broadcast32(q + r * q_stride + LANE * i);                              \
                for (int c = 0; c < G; c++) acc[r][c] = DOT(acc[r][c], query, key[c]);                     \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int c = 0; c < G; c++) v_store(scores + r * scores_stride + WIDTH * c, acc[r][c]);        \
    }
QK_TILE(qk_tile_wide, QK_GROUPS)
QK_TILE(qk_tile_single, 1)  // the last key groups where fewer than QK_GROUPS are left (77 text tokens)
#undef QK_TILE

// out[r] += sum over key steps [begin, end) of p[r][j] v[j], for `rows` <= R rows of NV vectors.
// `values`: [step][...][LANE] (values_stride elements per step), lane d of vector z holding
// v[LANE * j ...][z * WIDTH + d]; `probs` rows: key order.
#define PV_TILE(NV, R)                                                                                       \
    static void FN(pv_tile_##NV)(const ELEM *probs, int64_t probs_stride, int rows, const ELEM *values,    \
                                 int64_t values_stride, int64_t begin, int64_t end, float *out,            \
                                 int64_t out_stride) {                                                     \
        vec acc[R][NV];                                                                                    \
        for (int r = 0; r < R; r++)                                                                        \
            for (int z = 0; z < NV; z++)                                                                   \
                acc[r][z] = r < rows ? v_load(out + r * out_stride + z * WIDTH) : v_zero();                \
        for (int64_t j = begin; j < end; j++) {                                                            \
            vbits value[NV];                                                                               \
            for (int z = 0; z < NV; z++) value[z] = v_load_bits(values + j * values_stride + z * WIDTH * LANE); \
            for (int r = 0; r < R && r < rows; r++) {                                                      \
                const vbits p = broadcast32(probs + r * probs_stride + LANE * j);                          \
                for (int z = 0; z < NV; z++) acc[r][z] = DOT(acc[r][z], p, value[z]);                      \
            }                                                                                              \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            for (int z = 0; z < NV; z++) v_store(out + r * out_stride + z * WIDTH, acc[r][z]);             \
    }
PV_TILE_SHAPES(PV_TILE)
#undef PV_TILE

typedef void (*FN(pv_tile_t))(const ELEM *, int64_t, int, const ELEM *, int64_t, int64_t, int64_t, float *, int64_t);
#define PV_TILE_ENTRY(NV, R) FN(pv_tile_##NV),
#define PV_ROWS_ENTRY(NV, R) R,
static const FN(pv_tile_t) FN(PV_TILES)[PV_MAX_VECTORS + 1] = {NULL, PV_TILE_SHAPES(PV_TILE_ENTRY)};
static const int FN(PV_ROWS)[PV_MAX_VECTORS + 1] = {0, PV_TILE_SHAPES(PV_ROWS_ENTRY)};
#undef PV_TILE_ENTRY
#undef PV_ROWS_ENTRY

typedef struct {
    ELEM *keys, *values, *probs;
    float *scores, *acc;
} FN(workspace_t);

static void FN(attend_head)(const shape_t *s, const ELEM *q, int64_t q_stride, const ELEM *k, int64_t k_stride,
                            const ELEM *v, int64_t v_stride, ELEM *out, int64_t out_stride, float scale,
                            const FN(workspace_t) *w) {
    const int64_t steps = s->dim / LANE, group_stride = WIDTH * s->dim, value_steps = s->padded_keys / LANE;
    const int64_t width = s->vectors * WIDTH, np = s->padded_keys;
    // Padding keys get zero keys and values: their scores are masked below and their values add nothing.
    memset(w->keys, 0, s->key_groups * group_stride * sizeof(ELEM));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t i = 0; i < steps; i++)
            memcpy(w->keys + (j / WIDTH) * group_stride + (i * WIDTH + j % WIDTH) * LANE,
                   k + j * k_stride + LANE * i, LANE * sizeof(ELEM));
    memset(w->values, 0, value_steps * width * LANE * sizeof(ELEM));
    for (int64_t j = 0; j < s->keys; j++)
        for (int64_t d = 0; d < s->dim; d++) w->values[((j / LANE) * width + d) * LANE + j % LANE] = v[j * v_stride + d];

    // A head's output vectors in near-equal parts of at most PV_MAX_VECTORS, one tile shape each.
    const int64_t parts = (s->vectors + PV_MAX_VECTORS - 1) / PV_MAX_VECTORS;
    const vec scale_v = v_set(scale);
    for (int64_t row0 = 0; row0 < s->queries; row0 += ROW_BLOCK) {
        const int rows = s->queries - row0 < ROW_BLOCK ? (int)(s->queries - row0) : ROW_BLOCK;
        // Key tiles outer, rows inner: a tile's keys (5-10 KiB at dim 40) are read from L1 by every row.
        for (int64_t g = 0; g < s->key_groups;) {
            const int wide = s->key_groups - g >= QK_GROUPS;
            for (int r = 0; r < rows; r += QK_ROWS)
                (wide ? FN(qk_tile_wide) : FN(qk_tile_single))(
                    q + (row0 + r) * q_stride, q_stride, rows - r < QK_ROWS ? rows - r : QK_ROWS,
                    w->keys + g * group_stride, group_stride, steps, w->scores + r * np + g * WIDTH, np);
            g += wide ? QK_GROUPS : 1;
        }
        float inv_sum[ROW_BLOCK];
        for (int r = 0; r < rows; r++) {
            float *score = w->scores + r * np;
            for (int64_t j = s->keys; j < np; j++) score[j] = -INFINITY;
            vec max = v_set(-INFINITY), sum = v_zero();
            for (int64_t j = 0; j < np; j += WIDTH) max = v_max(max, v_load(score + j));
            // (s - max) * scale: scale > 0, so the max of the scaled scores is the scaled max.
            const vec row_max = v_set(v_reduce_max(max));
            ELEM *prob = w->probs + r * np;
            for (int64_t j = 0; j < np; j += 2 * WIDTH) {
                const vec e0 = exp_nonpositive(v_mul(v_sub(v_load(score + j), row_max), scale_v));
                const vec e1 = exp_nonpositive(v_mul(v_sub(v_load(score + j + WIDTH), row_max), scale_v));
                sum = v_add(sum, v_add(e0, e1));
                STORE_PROBS(prob + j, e0, e1);
            }
            inv_sum[r] = 1.0f / v_reduce_add(sum);
        }
        memset(w->acc, 0, (size_t)ROW_BLOCK * width * sizeof(float));
        for (int64_t j0 = 0; j0 < value_steps; j0 += PV_STEPS) {
            const int64_t j1 = j0 + PV_STEPS < value_steps ? j0 + PV_STEPS : value_steps;
            for (int64_t part = 0; part < parts; part++) {
                const int64_t first = part * s->vectors / parts, vectors = (part + 1) * s->vectors / parts - first;
                const FN(pv_tile_t) pv_tile = FN(PV_TILES)[vectors];
                const int pv_rows = FN(PV_ROWS)[vectors];
                for (int r = 0; r < rows; r += pv_rows)
                    pv_tile(w->probs + r * np, np, rows - r < pv_rows ? rows - r : pv_rows,
                            w->values + first * WIDTH * LANE, width * LANE, j0, j1, w->acc + r * width + first * WIDTH,
                            width);
            }
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
    if (dim < LANE || dim % LANE || dim > MAX_HEAD_DIM) return 2;
    // 2 * WIDTH-key multiples: the softmax writes probabilities two vectors at a time.
    shape_t s = {queries, keys, dim, (keys + 2 * WIDTH - 1) / (2 * WIDTH) * 2, 0, (dim + WIDTH - 1) / WIDTH};
    s.padded_keys = s.key_groups * WIDTH;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        FN(workspace_t) w = {
            aligned_alloc(64, s.key_groups * WIDTH * dim * sizeof(ELEM)),
            aligned_alloc(64, s.padded_keys * s.vectors * WIDTH * sizeof(ELEM)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(ELEM)),
            aligned_alloc(64, ROW_BLOCK * s.padded_keys * sizeof(float)),
            aligned_alloc(64, ROW_BLOCK * s.vectors * WIDTH * sizeof(float)),
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

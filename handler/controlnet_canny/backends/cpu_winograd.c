// The transforms of Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4 (Lavin & Gray 2016, "Fast
// Algorithms for Convolutional Neural Networks", eq. 8: Y = A^T [(G g G^T) * (B^T d B)] A), for
// cpu_winograd.py, which runs the products between them. Built once per instruction set by cpu_build.py.
//
// Layouts (fp32): the input x is channels last, [n][h][w][c]; an (m + 2) x (m + 2) tile at stride m starts one
// row and column before each m x m block of the output (zero padding 1, and zeros past an odd side). The
// transformed input v is [(m + 2)^2][tiles][c], tiles in (n, block row, block column) order, so that each of
// its (m + 2)^2 planes is one matrix for a product with the transformed weights. The products come back as
// (m + 2)^2 separate [tiles][c_out] matrices; the output y is channels last, [n][h][w][c_out], bias added.
//
// Both transforms run over LANES channels at a time (channel counts are multiples of LANES, checked by the
// caller): each one-dimensional transform below is a loop over those lanes, which the compiler vectorizes for
// the instruction set it was given. Tiles are split between threads by (image, block row).
#include <stdint.h>

#define LANES 16  // cpu_winograd.LANES: the caller offers only channel counts that are multiples of it

// One-dimensional transforms over LANES channels: element e of the input starts at d + e * s, of the output at
// o + e * os. F(2, 3) interpolates at 0, 1, -1 and infinity; F(4, 3) at 0, 1, -1, 2, -2 and infinity.
static inline void input_f2(const float *restrict d, int64_t s, float *restrict o, int64_t os) {  // B^T
    for (int l = 0; l < LANES; l++) {
        const float d0 = d[l], d1 = d[s + l], d2 = d[2 * s + l], d3 = d[3 * s + l];
        o[l] = d0 - d2;
        o[os + l] = d1 + d2;
        o[2 * os + l] = d2 - d1;
        o[3 * os + l] = d1 - d3;
    }
}

static inline void output_f2(const float *restrict m, int64_t s, float *restrict o, int64_t os) {  // A^T
    for (int l = 0; l < LANES; l++) {
        const float m0 = m[l], m1 = m[s + l], m2 = m[2 * s + l], m3 = m[3 * s + l];
        o[l] = m0 + m1 + m2;
        o[os + l] = m1 - m2 - m3;
    }
}

static inline void input_f4(const float *restrict d, int64_t s, float *restrict o, int64_t os) {  // B^T
    for (int l = 0; l < LANES; l++) {
        const float d0 = d[l], d1 = d[s + l], d2 = d[2 * s + l], d3 = d[3 * s + l], d4 = d[4 * s + l],
                    d5 = d[5 * s + l];
        o[l] = 4 * d0 - 5 * d2 + d4;
        o[os + l] = d3 + d4 - 4 * (d1 + d2);
        o[2 * os + l] = 4 * (d1 - d2) + d4 - d3;
        o[3 * os + l] = 2 * (d3 - d1) + d4 - d2;
        o[4 * os + l] = 2 * (d1 - d3) + d4 - d2;
        o[5 * os + l] = 4 * d1 - 5 * d3 + d5;
    }
}

static inline void output_f4(const float *restrict m, int64_t s, float *restrict o, int64_t os) {  // A^T
    for (int l = 0; l < LANES; l++) {
        const float m0 = m[l], m1 = m[s + l], m2 = m[2 * s + l], m3 = m[3 * s + l], m4 = m[4 * s + l],
                    m5 = m[5 * s + l];
        const float sum12 = m1 + m2, difference12 = m1 - m2, sum34 = m3 + m4, difference34 = m3 - m4;
        o[l] = m0 + sum12 + sum34;
        o[os + l] = difference12 + 2 * difference34;
        o[2 * os + l] = sum12 + 4 * sum34;
        o[3 * os + l] = difference12 + 8 * difference34 + m5;
    }
}

// v = B^T d B for every tile: columns first (stride A * LANES in d), then rows, written straight into v's planes.
#define INPUT_TRANSFORM(M, A)                                                                                    \
void winograd_f##M##_input(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, float *v, int threads) { \
    const int64_t rows = (h + M - 1) / M, cols = (w + M - 1) / M, plane = n * rows * cols * c;                   \
    _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads)")                                \
    for (int64_t b = 0; b < n; b++)                                                                              \
        for (int64_t r = 0; r < rows; r++)                                                                       \
            for (int64_t j = 0; j < cols; j++) {                                                                 \
                float *tile = v + ((b * rows + r) * cols + j) * c;                                               \
                for (int64_t c0 = 0; c0 < c; c0 += LANES) {                                                      \
                    float d[A][A][LANES], u[A][A][LANES];                                                        \
                    for (int i = 0; i < A; i++)                                                                  \
                        for (int k = 0; k < A; k++) {                                                            \
                            const int64_t y = M * r - 1 + i, xx = M * j - 1 + k;                                 \
                            const int inside = y >= 0 && y < h && xx >= 0 && xx < w;                             \
                            const float *pixel = x + ((b * h + (inside ? y : 0)) * w + (inside ? xx : 0)) * c + c0; \
                            for (int l = 0; l < LANES; l++) d[i][k][l] = inside ? pixel[l] : 0.0f;               \
                        }                                                                                        \
                    for (int k = 0; k < A; k++) input_f##M(d[0][k], A * LANES, u[0][k], A * LANES);              \
                    for (int a = 0; a < A; a++) input_f##M(u[a][0], LANES, tile + a * A * plane + c0, plane);    \
                }                                                                                                \
            }                                                                                                    \
}

// y = A^T m A + bias for every tile, the parts of the tile past an odd side dropped.
#define OUTPUT_TRANSFORM(M, A)                                                                                   \
void winograd_f##M##_output(const float *const *products, const float *bias, int64_t n, int64_t h, int64_t w,    \
                            int64_t c, float *y, int threads) {                                                  \
    const int64_t rows = (h + M - 1) / M, cols = (w + M - 1) / M;                                                \
    _Pragma("omp parallel for collapse(2) schedule(static) num_threads(threads)")                                \
    for (int64_t b = 0; b < n; b++)                                                                              \
        for (int64_t r = 0; r < rows; r++)                                                                       \
            for (int64_t j = 0; j < cols; j++) {                                                                 \
                const int64_t tile = (b * rows + r) * cols + j;                                                  \
                const int64_t height = h - M * r < M ? h - M * r : M, width = w - M * j < M ? w - M * j : M;     \
                float *block = y + ((b * h + M * r) * w + M * j) * c;                                            \
                for (int64_t c0 = 0; c0 < c; c0 += LANES) {                                                      \
                    float m[A][A][LANES], u[M][A][LANES], out[M][M][LANES];                                      \
                    for (int i = 0; i < A * A; i++)                                                              \
                        for (int l = 0; l < LANES; l++) m[i / A][i % A][l] = products[i][tile * c + c0 + l];     \
                    for (int k = 0; k < A; k++) output_f##M(m[0][k], A * LANES, u[0][k], A * LANES);             \
                    for (int i = 0; i < M; i++) output_f##M(u[i][0], LANES, out[i][0], LANES);                   \
                    for (int i = 0; i < height; i++)                                                             \
                        for (int k = 0; k < width; k++)                                                          \
                            for (int l = 0; l < LANES; l++)                                                      \
                                block[(i * w + k) * c + c0 + l] = out[i][k][l] + (bias ? bias[c0 + l] : 0.0f);   \
                }                                                                                                \
            }                                                                                                    \
}

INPUT_TRANSFORM(2, 4)
OUTPUT_TRANSFORM(2, 4)
INPUT_TRANSFORM(4, 6)
OUTPUT_TRANSFORM(4, 6)

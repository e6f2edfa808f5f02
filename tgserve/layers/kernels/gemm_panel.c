/* bf16 linear layers at every batch size, on CPUs with AVX-512 BF16: y[m, n] = x[m, k] . w[n, k]
 * (+ bias[n]), float32 sums, the output rounded to bf16 (nearest even), the bias added before.
 *
 * The weight is repacked once (cpu_kernels.panel_pack) into panels of 64 output columns, each k-pair
 * of a panel 64 x 2 values side by side: [n / 64][k / 2][64][2]. A task computes a tile of 4 rows x
 * 64 columns: per k-pair, four 64-byte loads of the panel, one broadcast pair per row, sixteen
 * vdpbf16ps into 16 accumulators that stay in registers; tasks are (panel, 4-row block) pairs split
 * statically over the threads. On the Zen 4 this was written on it ran the SmolLM2 shapes at ~410
 * GFLOP/s at 64 rows where oneDNN's packed GEMM ran 260-385 (this CPU's peak ~427), streamed the
 * weights 2-3x faster than oneDNN at 5-16 rows, and at 1-4 rows faster than linear_small.c's
 * row-major kernel (44 against 41 GB/s at one row, 27-29 at two to four).
 *
 * Needs n % 64 == 0 and k % 2 == 0 (gemm_panel_available() says whether it was built). The same
 * tiles also run a gated MLP's [gate | up] projection with its SiLU fused (gemm_panel_silu_bf16).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include "avx512_bf16.h"

int gemm_panel_available(void) { return 1; }

/* One 4-row x 64-column tile: acc[i][c] = sum over k of row i of x times the panel's columns c*16..c*16+15.
 * xr: each row's k-pairs as 32-bit words (a row past the batch repeats a real one). */
static inline __attribute__((always_inline)) void tile_4x64(const uint32_t* const xr[4], const uint16_t* panel,
                                                            int pairs, __m512 acc[4][4]) {
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
    for (int j = 0; j < pairs; j++) {
        const uint16_t* w = panel + (int64_t)j * 128;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96);
        for (int i = 0; i < 4; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)xr[i][j]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, w1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, w2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, w3);
        }
    }
}

static inline int block_rows(const uint16_t* x, int m, int k, int b, const uint32_t* xr[4]) {
    const int m0 = b * 4, rows = m - m0 < 4 ? m - m0 : 4;
    for (int i = 0; i < 4; i++) xr[i] = (const uint32_t*)(x + (int64_t)(m0 + (i < rows ? i : 0)) * k);
    return rows;
}

/* y = x W^T (+ bias) into bf16 y, or (f32) into float32 y holding the same bf16-rounded values:
 * what .float() of the bf16 result gives, without the pass that converts it (an LM head's logits) */
static inline __attribute__((always_inline)) void gemm_panel(const uint16_t* x, const uint16_t* panels,
                                                             const uint16_t* bias, void* y, int m, int n, int k,
                                                             int f32) {
    const int pairs = k / 2, num_panels = n / 64, blocks = (m + 3) / 4;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int p = 0; p < num_panels; p++) {
        for (int b = 0; b < blocks; b++) {
            const uint32_t* xr[4];
            const int m0 = b * 4, rows = block_rows(x, m, k, b, xr);
            __m512 acc[4][4];
            tile_4x64(xr, panels + (int64_t)p * pairs * 128, pairs, acc);
            for (int c = 0; c < 4; c++) {
                __m512 add = _mm512_setzero_ps();
                if (bias) add = bf16x16_in(bias + p * 64 + c * 16);
                for (int i = 0; i < rows; i++) {
                    const int64_t at = (int64_t)(m0 + i) * n + p * 64 + c * 16;
                    if (f32) _mm512_storeu_ps((float*)y + at, round_bf16(_mm512_add_ps(acc[i][c], add)));
                    else _mm256_storeu_si256((__m256i*)((uint16_t*)y + at),
                                             (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][c], add)));
                }
            }
        }
    }
}

void gemm_panel_bf16(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, uint16_t* y, int m, int n,
                     int k) {
    gemm_panel(x, panels, bias, y, m, n, k, 0);
}

void gemm_panel_bf16_f32(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, float* y, int m, int n,
                         int k) {
    gemm_panel(x, panels, bias, y, m, n, k, 1);
}

/* A fused [gate | up] projection (n = 2 * width outputs, no bias) and silu(gate) * up after it:
 * y[m, width]; the projection goes to `scratch` [m, n]. Each thread computes a gate tile and the
 * matching up tile (panels p and p + width / 64), then, after all its tiles, the SiLU over exactly
 * those tiles (the same static split of the same loop: OpenMP gives each thread the same
 * iterations), so it reads what its own core just wrote. A separate pass split by rows read half of
 * it from the other core's cache: ~200 us per SmolLM2 layer at 64 rows where the arithmetic takes
 * ~35. (Doing the SiLU in each tile's epilogue instead ran slower still.) The bits are those of
 * gemm_panel_bf16 followed by silu_mul_bf16. Needs width % 64 == 0. */
void gemm_panel_silu_bf16(const uint16_t* x, const uint16_t* panels, uint16_t* scratch, uint16_t* y, int m, int n,
                          int k) {
    const int pairs = k / 2, width = n / 2, half_panels = width / 64, blocks = (m + 3) / 4;
    #pragma omp parallel
    {
        #pragma omp for schedule(static) collapse(2) nowait
        for (int p = 0; p < half_panels; p++) {
            for (int b = 0; b < blocks; b++) {
                const uint32_t* xr[4];
                const int m0 = b * 4, rows = block_rows(x, m, k, b, xr);
                for (int half = 0; half < 2; half++) {
                    const int panel = p + half * half_panels;
                    __m512 acc[4][4];
                    tile_4x64(xr, panels + (int64_t)panel * pairs * 128, pairs, acc);
                    for (int i = 0; i < rows; i++)
                        for (int c = 0; c < 4; c++)
                            _mm256_storeu_si256((__m256i*)(scratch + (int64_t)(m0 + i) * n + panel * 64 + c * 16),
                                                (__m256i)_mm512_cvtneps_pbh(acc[i][c]));
                }
            }
        }
        #pragma omp for schedule(static) collapse(2)
        for (int p = 0; p < half_panels; p++) {
            for (int b = 0; b < blocks; b++) {
                const int m0 = b * 4, rows = m - m0 < 4 ? m - m0 : 4;
                for (int i = 0; i < rows; i++) {
                    const uint16_t* gate = scratch + (int64_t)(m0 + i) * n + p * 64;
                    for (int c = 0; c < 4; c++)
                        _mm256_storeu_si256((__m256i*)(y + (int64_t)(m0 + i) * width + p * 64 + c * 16),
                                            (__m256i)_mm512_cvtneps_pbh(silu_mul_ps(bf16x16_in(gate + c * 16),
                                                                                    bf16x16_in(gate + width + c * 16))));
                }
            }
        }
    }
}
#else
int gemm_panel_available(void) { return 0; }
void gemm_panel_bf16(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, uint16_t* y, int m, int n,
                     int k) { (void)x; (void)panels; (void)bias; (void)y; (void)m; (void)n; (void)k; }
void gemm_panel_silu_bf16(const uint16_t* x, const uint16_t* panels, uint16_t* scratch, uint16_t* y, int m, int n,
                          int k) { (void)x; (void)panels; (void)scratch; (void)y; (void)m; (void)n; (void)k; }
void gemm_panel_bf16_f32(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, float* y, int m, int n,
                         int k) { (void)x; (void)panels; (void)bias; (void)y; (void)m; (void)n; (void)k; }
#endif

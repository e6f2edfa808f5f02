/* bf16 linear layers at every batch size, on CPUs with AVX-512 BF16 (or AVX2, below): y[m, n] = x[m, k] . w[n, k]
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
 * Needs n % 64 == 0 and k % 2 == 0 (gemm_panel_available() says whether it was built: 1 for
 * AVX-512 BF16, 2 for AVX2). The same
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
#elif defined(__AVX2__) && defined(__FMA__)
/* The same panels on CPUs with AVX2 and FMA but no AVX-512 BF16 (e.g. AMD Zen 3). A 32-bit word of
 * a panel holds one column's k-pair, so one 256-bit load gives 8 columns: shifted left 16 bits
 * the even k as float32, masked to its high half the odd k. Products are float32 FMAs, exact for
 * bf16 values as vdpbf16ps's; only the order of the float32 sums differs from the AVX-512 kernel.
 * One row streams its panel once, widening in registers (memory-bound: the weights' bytes at the
 * machine's read bandwidth, half those of a float32 weight). Two rows or more widen a chunk of
 * KC k-pairs once into float32 (16 KB, in L1) and run it for every row of the task (up to MB rows,
 * tiles of 6 rows x 16 columns: 12 accumulators in AVX2's 16 registers), the sums kept in a small
 * per-task buffer between chunks. */
#include <stdlib.h>
#include "avx2_bf16.h"

int gemm_panel_available(void) { return 2; }

#define KC 32  /* k-pairs widened at a time */
#define MB 48  /* rows per task */

static inline __m256 pair_lo(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 pair_hi(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* one row x 64 columns: acc[g] = columns 8g..8g+7 */
static inline void row_1x64(const float* xf, const uint16_t* panel, int pairs, float* out) {
    __m256 acc[8];
    for (int g = 0; g < 8; g++) acc[g] = _mm256_setzero_ps();
    for (int j = 0; j < pairs; j++) {
        const __m256 xe = _mm256_broadcast_ss(xf + 2 * j), xo = _mm256_broadcast_ss(xf + 2 * j + 1);
        const uint16_t* w = panel + (int64_t)j * 128;
        for (int g = 0; g < 8; g++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + g * 16));
            acc[g] = _mm256_fmadd_ps(xo, pair_hi(v), _mm256_fmadd_ps(xe, pair_lo(v), acc[g]));
        }
    }
    for (int g = 0; g < 8; g++) _mm256_storeu_ps(out + g * 8, acc[g]);
}

/* R rows x 16 columns (group q) over a widened chunk, wf[s][64] = k-step s (k = 2 * j0 + s) */
static inline __attribute__((always_inline)) void chunk_tile(const int R, const float* xf, int k, int j0,
                                                             const float* wf, int kc, int q, float* sums) {
    __m256 a[6][2];
    for (int i = 0; i < R; i++) {
        a[i][0] = _mm256_loadu_ps(sums + i * 64 + q * 16);
        a[i][1] = _mm256_loadu_ps(sums + i * 64 + q * 16 + 8);
    }
    const float* x0 = xf + 2 * j0;
    for (int s = 0; s < 2 * kc; s++) {
        const __m256 w0 = _mm256_loadu_ps(wf + s * 64 + q * 16), w1 = _mm256_loadu_ps(wf + s * 64 + q * 16 + 8);
        for (int i = 0; i < R; i++) {
            const __m256 b = _mm256_broadcast_ss(x0 + (int64_t)i * k + s);
            a[i][0] = _mm256_fmadd_ps(b, w0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(b, w1, a[i][1]);
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(sums + i * 64 + q * 16, a[i][0]);
        _mm256_storeu_ps(sums + i * 64 + q * 16 + 8, a[i][1]);
    }
}

/* R rows (up to 6) x 16 columns (group q) over the whole panel, widening in registers: the panel's
 * k-pair records are 256 bytes and this pass reads 64 of each, so the first pass (q == 0) fetches
 * every record ahead in order, for the later passes to find in L2 */
#define PANEL_PREFETCH 8  /* k-pairs ahead */
#ifndef REG_ROWS
#define REG_ROWS 12
#endif
static inline __attribute__((always_inline)) void reg_tile(const int R, const float* xf, int k, const uint16_t* panel,
                                                           int pairs, int q, float* sums) {
    __m256 a[6][2];
    for (int i = 0; i < R; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (int j = 0; j < pairs; j++) {
        const uint16_t* w = panel + (int64_t)j * 128 + q * 32;
        if (q == 0 && j + PANEL_PREFETCH < pairs)
            for (int line = 0; line < 4; line++)
                _mm_prefetch((const char*)(panel + (int64_t)(j + PANEL_PREFETCH) * 128 + line * 32), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {  /* columns 16q + 8h .. + 7 */
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + h * 16));
            const __m256 lo = pair_lo(v), hi = pair_hi(v);
            for (int i = 0; i < R; i++)
                a[i][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(xf + (int64_t)i * k + 2 * j + 1), hi,
                                          _mm256_fmadd_ps(_mm256_broadcast_ss(xf + (int64_t)i * k + 2 * j), lo, a[i][h]));
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(sums + i * 64 + q * 16, a[i][0]);
        _mm256_storeu_ps(sums + i * 64 + q * 16 + 8, a[i][1]);
    }
}

static void reg_rows(int rows, const float* xf, int k, const uint16_t* panel, int pairs, float* sums) {
    for (int q = 0; q < 4; q++)
        switch (rows) {
            case 6: reg_tile(6, xf, k, panel, pairs, q, sums); break;
            case 5: reg_tile(5, xf, k, panel, pairs, q, sums); break;
            case 4: reg_tile(4, xf, k, panel, pairs, q, sums); break;
            case 3: reg_tile(3, xf, k, panel, pairs, q, sums); break;
            case 2: reg_tile(2, xf, k, panel, pairs, q, sums); break;
            default: reg_tile(1, xf, k, panel, pairs, q, sums); break;
        }
}

/* sums[rows][64] = the task's rows of xf (float32, k wide) times one panel; wf: KC * 128 floats */
static void panel_task(const float* xf, int rows, int k, const uint16_t* panel, float* wf, float* sums) {
    const int pairs = k / 2;
    if (rows == 1) {
        row_1x64(xf, panel, pairs, sums);
        return;
    }
    if (rows <= REG_ROWS) {  /* too few rows to pay for widening the panel in memory: 6 at a time */
        for (int r0 = 0; r0 < rows; r0 += 6)
            reg_rows(rows - r0 < 6 ? rows - r0 : 6, xf + (int64_t)r0 * k, k, panel, pairs, sums + r0 * 64);
        return;
    }
    memset(sums, 0, sizeof(float) * rows * 64);
    for (int j0 = 0; j0 < pairs; j0 += KC) {
        const int kc = pairs - j0 < KC ? pairs - j0 : KC;
        for (int j = 0; j < kc; j++)
            for (int g = 0; g < 8; g++) {  /* lane c of the load is column 8g + c */
                const __m256i v = _mm256_loadu_si256((const __m256i*)(panel + (int64_t)(j0 + j) * 128 + g * 16));
                _mm256_storeu_ps(wf + j * 128 + g * 8, pair_lo(v));
                _mm256_storeu_ps(wf + j * 128 + 64 + g * 8, pair_hi(v));
            }
        for (int r0 = 0; r0 < rows; r0 += 6) {
            const float* xr = xf + (int64_t)r0 * k;
            float* sr = sums + r0 * 64;
            for (int q = 0; q < 4; q++)
                switch (rows - r0 < 6 ? rows - r0 : 6) {
                    case 6: chunk_tile(6, xr, k, j0, wf, kc, q, sr); break;
                    case 5: chunk_tile(5, xr, k, j0, wf, kc, q, sr); break;
                    case 4: chunk_tile(4, xr, k, j0, wf, kc, q, sr); break;
                    case 3: chunk_tile(3, xr, k, j0, wf, kc, q, sr); break;
                    case 2: chunk_tile(2, xr, k, j0, wf, kc, q, sr); break;
                    default: chunk_tile(1, xr, k, j0, wf, kc, q, sr); break;
                }
        }
    }
}

/* x as float32 (bf16 values widened), m x k, for the tasks to read: called by every thread of the
 * GEMM's parallel region (one region per call: waking the threads twice cost more than this loop) */
static void widen_input(const uint16_t* x, float* xf, int m, int k) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)m * k; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        memcpy(xf + i, &u, 4);
    }
}

/* one task's sums (+ bias) into y's rows m0.. and columns col0..col0+63, bf16 or (f32) float32 */
static void store_sums(const float* sums, int rows, const uint16_t* bias, void* y, int n, int m0, int col0, int f32) {
    for (int i = 0; i < rows; i++)
        for (int g = 0; g < 8; g++) {
            __m256 v = _mm256_loadu_ps(sums + i * 64 + g * 8);
            if (bias) v = _mm256_add_ps(v, bf16x8_in(bias + col0 + g * 8));
            const int64_t at = (int64_t)(m0 + i) * n + col0 + g * 8;
            if (f32) _mm256_storeu_ps((float*)y + at, round_bf16_8(v));
            else _mm_storeu_si128((__m128i*)((uint16_t*)y + at), bf16x8_out(v));
        }
}

static void gemm_panel(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, void* y, int m, int n, int k,
                       int f32) {
    const int pairs = k / 2, num_panels = n / 64, blocks = (m + MB - 1) / MB;
    float* xf = malloc(sizeof(float) * (size_t)m * k);
    #pragma omp parallel
    {
        widen_input(x, xf, m, k);
        float* wf = malloc(sizeof(float) * (KC * 128 + MB * 64));
        float* sums = wf + KC * 128;
        #pragma omp for schedule(static) collapse(2)
        for (int p = 0; p < num_panels; p++)
            for (int b = 0; b < blocks; b++) {
                const int m0 = b * MB, rows = m - m0 < MB ? m - m0 : MB;
                panel_task(xf + (int64_t)m0 * k, rows, k, panels + (int64_t)p * pairs * 128, wf, sums);
                store_sums(sums, rows, bias, y, n, m0, p * 64, f32);
            }
        free(wf);
    }
    free(xf);
}

/* The fused [gate | up] projection and its SiLU, as the AVX-512 kernel does it (each thread's own
 * tiles, then the SiLU over exactly those): the bits of gemm_panel_bf16 then silu_mul_bf16. */
void gemm_panel_silu_bf16(const uint16_t* x, const uint16_t* panels, uint16_t* scratch, uint16_t* y, int m, int n,
                          int k) {
    const int pairs = k / 2, width = n / 2, half_panels = width / 64, blocks = (m + MB - 1) / MB;
    float* xf = malloc(sizeof(float) * (size_t)m * k);
    #pragma omp parallel
    {
        widen_input(x, xf, m, k);
        float* wf = malloc(sizeof(float) * (KC * 128 + MB * 64));
        float* sums = wf + KC * 128;
        #pragma omp for schedule(static) collapse(2) nowait
        for (int p = 0; p < half_panels; p++)
            for (int b = 0; b < blocks; b++) {
                const int m0 = b * MB, rows = m - m0 < MB ? m - m0 : MB;
                for (int half = 0; half < 2; half++) {
                    const int panel = p + half * half_panels;
                    panel_task(xf + (int64_t)m0 * k, rows, k, panels + (int64_t)panel * pairs * 128, wf, sums);
                    store_sums(sums, rows, NULL, scratch, n, m0, panel * 64, 0);
                }
            }
        #pragma omp for schedule(static) collapse(2)
        for (int p = 0; p < half_panels; p++)
            for (int b = 0; b < blocks; b++) {
                const int m0 = b * MB, rows = m - m0 < MB ? m - m0 : MB;
                for (int i = 0; i < rows; i++) {
                    const uint16_t* gate = scratch + (int64_t)(m0 + i) * n + p * 64;
                    for (int c = 0; c < 64; c += 8)
                        _mm_storeu_si128((__m128i*)(y + (int64_t)(m0 + i) * width + p * 64 + c),
                                         bf16x8_out(silu_mul8(bf16x8_in(gate + c), bf16x8_in(gate + width + c))));
                }
            }
        free(wf);
    }
    free(xf);
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

#if (defined(__AVX512BF16__) && defined(__AVX512F__)) || (defined(__AVX2__) && defined(__FMA__))
/* either build's gemm_panel: bf16 out, or float32 out holding the bf16-rounded values */
void gemm_panel_bf16(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, uint16_t* y, int m, int n,
                     int k) {
    gemm_panel(x, panels, bias, y, m, n, k, 0);
}

void gemm_panel_bf16_f32(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, float* y, int m, int n,
                         int k) {
    gemm_panel(x, panels, bias, y, m, n, k, 1);
}
#endif

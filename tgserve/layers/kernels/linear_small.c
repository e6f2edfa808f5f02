/* Linear layers for decode-sized batches (a few rows): bfloat16 on CPUs with AVX-512 BF16, float32
 * on CPUs with AVX2 and FMA.
 *
 * y[m, n] = x[m, k] . w[n, k] (+ bias[n]) with w in its plain row-major layout. A decode step
 * reads every weight once, so its time is the time to stream the weights from memory: each
 * thread takes one contiguous run of output rows and reads it front to back (what the hardware
 * prefetcher wants), every row's 32-value chunks multiplied into float accumulators with
 * vdpbf16ps (bf16 products are exact in float32; the sum is float32, as oneDNN's). On this
 * kind of machine that streams ~27 GB/s where oneDNN's packed GEMM reads ~16.5 GB/s at one row.
 * The output is rounded to bf16 (round to nearest even), the bias added before rounding.
 *
 * Built only where the compiler targets AVX-512 BF16 (linear_small_available() says so).
 *
 * float32 (linear_small_f32, where linear_small_f32_available()): the same split of the output rows,
 * each row's dot product over 8-wide FMA chains (four chains for one or two rows, two for three or
 * four: every accumulator stays in a register on AVX2's 16), summed across lanes, then its tail;
 * bias added last. 256-bit vectors: AVX2 machines' widest, and as fast as 512-bit ones on AMD's
 * AVX-512 parts (which split them in two). It streams the weights at the machine's read bandwidth
 * (~30 GB/s in a process where a plain read of the same bytes runs ~30), where oneDNN's packed
 * float32 matmul reads ~22 at one or two rows.
 */
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 4

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

static inline float bf16_in(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_out(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

int linear_small_available(void) { return MAX_ROWS; }

void linear_small_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                       int m, int n, int k) {
    const int full = k / 32 * 32;
    const __mmask32 tail = (__mmask32)((k - full) ? ((1u << (k - full)) - 1) : 0);
    #pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = (int64_t)n * t / nt, hi = (int64_t)n * (t + 1) / nt;
        for (int64_t r = lo; r < hi; r++) {
            const uint16_t* wr = w + r * k;
            __m512 acc[2][MAX_ROWS];
            for (int i = 0; i < m; i++) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
            int kk = 0;
            for (; kk + 64 <= full; kk += 64) {  /* two chains of accumulators: latency hidden */
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + kk);
                const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + kk + 32);
                for (int i = 0; i < m; i++) {
                    const uint16_t* xi = x + (int64_t)i * k + kk;
                    acc[0][i] = _mm512_dpbf16_ps(acc[0][i], (__m512bh)_mm512_loadu_si512(xi), w0);
                    acc[1][i] = _mm512_dpbf16_ps(acc[1][i], (__m512bh)_mm512_loadu_si512(xi + 32), w1);
                }
            }
            for (; kk < full; kk += 32) {
                const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + kk);
                for (int i = 0; i < m; i++)
                    acc[0][i] = _mm512_dpbf16_ps(acc[0][i], (__m512bh)_mm512_loadu_si512(x + (int64_t)i * k + kk), w0);
            }
            if (tail) {
                const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + full);
                for (int i = 0; i < m; i++)
                    acc[0][i] = _mm512_dpbf16_ps(
                        acc[0][i], (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (int64_t)i * k + full), w0);
            }
            const float b = bias ? bf16_in(bias[r]) : 0.f;
            for (int i = 0; i < m; i++)
                y[(int64_t)i * n + r] = bf16_out(_mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i])) + b);
        }
    }
}
#else
int linear_small_available(void) { return 0; }
void linear_small_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                       int m, int n, int k) { (void)x; (void)w; (void)bias; (void)y; (void)m; (void)n; (void)k; }
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>

int linear_small_f32_available(void) { return MAX_ROWS; }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* output rows [lo, hi) for M input rows with C chains; inlined with constants, so the loops unroll
 * and the accumulators live in registers */
static inline __attribute__((always_inline)) void small_f32_rows(
        const int M, const int C, const float* x, const float* w, const float* bias, float* y, int n, int k,
        int64_t lo, int64_t hi) {
    const int step = 8 * C, full = k / step * step;
    for (int64_t r = lo; r < hi; r++) {
        const float* wr = w + r * k;
        __m256 acc[MAX_ROWS][4];
        for (int i = 0; i < M; i++)
            for (int c = 0; c < C; c++) acc[i][c] = _mm256_setzero_ps();
        for (int kk = 0; kk < full; kk += step)
            for (int c = 0; c < C; c++) {
                const __m256 wv = _mm256_loadu_ps(wr + kk + 8 * c);
                for (int i = 0; i < M; i++)
                    acc[i][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (int64_t)i * k + kk + 8 * c), wv, acc[i][c]);
            }
        for (int i = 0; i < M; i++) {
            __m256 sum = acc[i][0];
            for (int c = 1; c < C; c++) sum = _mm256_add_ps(sum, acc[i][c]);
            const float* xi = x + (int64_t)i * k;
            float s = hsum8(sum);
            for (int kk = full; kk < k; kk++) s += xi[kk] * wr[kk];
            y[(int64_t)i * n + r] = s + (bias ? bias[r] : 0.f);
        }
    }
}

void linear_small_f32(const float* x, const float* w, const float* bias, float* y, int m, int n, int k) {
    #pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = (int64_t)n * t / nt, hi = (int64_t)n * (t + 1) / nt;
        switch (m) {
            case 1: small_f32_rows(1, 4, x, w, bias, y, n, k, lo, hi); break;
            case 2: small_f32_rows(2, 4, x, w, bias, y, n, k, lo, hi); break;
            case 3: small_f32_rows(3, 2, x, w, bias, y, n, k, lo, hi); break;
            default: small_f32_rows(4, 2, x, w, bias, y, n, k, lo, hi); break;
        }
    }
}
#else
int linear_small_f32_available(void) { return 0; }
void linear_small_f32(const float* x, const float* w, const float* bias, float* y, int m, int n, int k) {
    (void)x; (void)w; (void)bias; (void)y; (void)m; (void)n; (void)k;
}
#endif

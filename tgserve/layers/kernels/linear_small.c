/* Linear layers for decode-sized batches (a few rows), bfloat16, on CPUs with AVX-512 BF16.
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

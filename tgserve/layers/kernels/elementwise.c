/* A decoder layer's small element-wise steps, each one pass instead of PyTorch's chain of ops (an
 * RMSNorm is eight of them, a rotary embedding fourteen): per-op overhead, not arithmetic, is
 * what they cost at decode batch sizes. Each rounds where the PyTorch formula it replaces rounds
 * (a bf16 result for every bf16 op, statistics in float32): in bfloat16 the RMSNorm and the rotary
 * embedding give PyTorch's bits, the SiLU differs where its float32 value sits on a bf16 rounding
 * boundary (now and then: this exp and PyTorch's differ in the last bit). In float32 only the
 * rotary embedding is here (element-wise products and sums, no FMA contraction: PyTorch's bits);
 * a float32 RMSNorm or SiLU would differ in the last bit (sum order, exp), and float32 is the
 * dtype whose greedy output must equal transformers'. Rows in parallel.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even */
    return (uint16_t)(u >> 16);
}
#define F32_IN(x) (x)
#define F32_ROUND(x) (x)  /* a float32 op's result is already float32 */
#define F32_OUT(x) (x)
#define BF16_IN(x) bf(x)
#define BF16_ROUND(x) bf(to_bf(x))  /* the value a bf16 op would have produced */
#define BF16_OUT(x) to_bf(x)

/* Llama's RMSNorm: h = x * rsqrt(mean(x^2) + eps) in float32, rounded to the dtype, times weight.
 * One row; never inlined, so the plain and the fused (add_rms_norm) kernels run the same code and
 * give the same bits. */
#define DEFINE_RMS_NORM(NAME, T, IN, ROUND, OUT)                                                   \
__attribute__((noinline)) static void NAME##_row(const T* xr, const T* weight, T* o, int64_t hidden, \
                                                 float eps) {                                      \
    float ss = 0.f;                                                                                \
    _Pragma("omp simd reduction(+:ss)")                                                            \
    for (int64_t i = 0; i < hidden; i++) { const float v = IN(xr[i]); ss += v * v; }              \
    const float inv = 1.f / sqrtf(ss / (float)hidden + eps);                                       \
    _Pragma("omp simd")                                                                            \
    for (int64_t i = 0; i < hidden; i++) o[i] = OUT(IN(weight[i]) * ROUND(IN(xr[i]) * inv));       \
}                                                                                                  \
void NAME(const T* x, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {          \
    _Pragma("omp parallel for schedule(static)")                                                   \
    for (int64_t r = 0; r < rows; r++) NAME##_row(x + r * hidden, weight, out + r * hidden, hidden, eps); \
}                                                                                                  \
/* The residual add before it, in the same pass: sum = x + y (rounded as the dtype's add rounds),  \
 * out = RMSNorm(sum): what `x = x + y; h = norm(x)` gives, without a pass and an op between. */   \
void add_##NAME(const T* x, const T* y, const T* weight, T* sum, T* out, int64_t rows, int64_t hidden, \
                float eps) {                                                                       \
    _Pragma("omp parallel for schedule(static)")                                                   \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T* xr = x + r * hidden;                                                              \
        const T* yr = y + r * hidden;                                                              \
        T* sr = sum + r * hidden;                                                                  \
        _Pragma("omp simd")                                                                        \
        for (int64_t i = 0; i < hidden; i++) sr[i] = OUT(IN(xr[i]) + IN(yr[i]));                  \
        NAME##_row(sr, weight, out + r * hidden, hidden, eps);                                     \
    }                                                                                              \
}

/* Rotary embedding, "rotate half" layout, the whole head rotated: for i < half,
 * out[i] = x[i] cos[i] - x[i + half] sin[i], out[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half],
 * each product and the sum rounded as the PyTorch formula (q * cos + rotate_half(q) * sin) rounds.
 * x rows may be strided (q and k are views of the fused qkv projection); out is contiguous. */
#define DEFINE_ROTARY(NAME, T, IN, ROUND, OUT)                                                     \
__attribute__((optimize("fp-contract=off")))                                                       \
static void NAME##_one(const T* x, int64_t x_stride, T* out, const int64_t* positions, const T* cos,\
                       const T* sin, int64_t tokens, int heads, int head_dim) {                     \
    const int half = head_dim / 2;                                                                 \
    _Pragma("omp parallel for schedule(static)")                                                   \
    for (int64_t t = 0; t < tokens; t++) {                                                         \
        const T* c = cos + positions[t] * head_dim;                                                \
        const T* s = sin + positions[t] * head_dim;                                                \
        for (int h = 0; h < heads; h++) {                                                          \
            const T* xh = x + t * x_stride + (int64_t)h * head_dim;                                \
            T* oh = out + (t * heads + h) * (int64_t)head_dim;                                     \
            _Pragma("omp simd")                                                                    \
            for (int i = 0; i < half; i++) {                                                       \
                const float a = IN(xh[i]), b = IN(xh[i + half]);                                   \
                oh[i] = OUT(ROUND(a * IN(c[i])) + ROUND(-b * IN(s[i])));                           \
                oh[i + half] = OUT(ROUND(b * IN(c[i + half])) + ROUND(a * IN(s[i + half])));       \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
void NAME(const T* q, int64_t q_stride, const T* k, int64_t k_stride, T* q_out, T* k_out,          \
          const int64_t* positions, const T* cos, const T* sin, int64_t tokens, int heads,         \
          int kv_heads, int head_dim) {                                                            \
    NAME##_one(q, q_stride, q_out, positions, cos, sin, tokens, heads, head_dim);                  \
    NAME##_one(k, k_stride, k_out, positions, cos, sin, tokens, kv_heads, head_dim);               \
}

/* silu(gate) * up over the fused [gate | up] projection: silu rounded to the dtype, then the
 * product (as F.silu(gate) * up). */
#define DEFINE_SILU_MUL(NAME, T, IN, ROUND, OUT)                                                   \
void NAME(const T* x, T* out, int64_t rows, int64_t width) {                                       \
    _Pragma("omp parallel for schedule(static)")                                                   \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T* gate = x + r * 2 * width;                                                         \
        const T* up = gate + width;                                                                \
        T* o = out + r * width;                                                                    \
        _Pragma("omp simd")                                                                        \
        for (int64_t i = 0; i < width; i++) {                                                      \
            const float g = IN(gate[i]);                                                           \
            o[i] = OUT(ROUND(g / (1.f + expf(-g))) * IN(up[i]));                                   \
        }                                                                                          \
    }                                                                                              \
}

DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, BF16_IN, BF16_ROUND, BF16_OUT)
DEFINE_ROTARY(rotary_f32, float, F32_IN, F32_ROUND, F32_OUT)
DEFINE_ROTARY(rotary_bf16_generic, uint16_t, BF16_IN, BF16_ROUND, BF16_OUT)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include "avx512_bf16.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "avx2_bf16.h"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
/* The same bf16 rotary, 16 lanes at a time, for head_dim a multiple of 32: each product and the
 * sum rounded to bf16 with vcvtneps2bf16 (round to nearest even, as the scalar formula), so the
 * same bits for finite inputs. The generic loop above did not vectorise (its rounding is integer
 * work on float bits): 64 rows x 12 heads of SmolLM2 took ~70 us per layer. */
static void rotary_bf16_one_avx512(const uint16_t* x, int64_t x_stride, uint16_t* out, const int64_t* positions,
                                   const uint16_t* cos, const uint16_t* sin, int64_t tokens, int heads, int head_dim) {
    const int half = head_dim / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t* c = cos + positions[t] * head_dim;
        const uint16_t* s = sin + positions[t] * head_dim;
        for (int h = 0; h < heads; h++) {
            const uint16_t* xh = x + t * x_stride + (int64_t)h * head_dim;
            uint16_t* oh = out + (t * heads + h) * (int64_t)head_dim;
            for (int i = 0; i < half; i += 16) {
                const __m512 a = bf16x16_in(xh + i), b = bf16x16_in(xh + i + half);
                const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, bf16x16_in(c + i))),
                                                round_bf16(_mm512_mul_ps(negate(b),
                                                                         bf16x16_in(s + i))));
                const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, bf16x16_in(c + i + half))),
                                                round_bf16(_mm512_mul_ps(a, bf16x16_in(s + i + half))));
                _mm256_storeu_si256((__m256i*)(oh + i), (__m256i)_mm512_cvtneps_pbh(lo));
                _mm256_storeu_si256((__m256i*)(oh + i + half), (__m256i)_mm512_cvtneps_pbh(hi));
            }
        }
    }
}
#endif

#if !(defined(__AVX512BF16__) && defined(__AVX512F__)) && defined(__AVX2__) && defined(__FMA__)
/* Its AVX2 twin, 8 lanes at a time, for head_dim a multiple of 16: the same bits. */
static void rotary_bf16_one_avx2(const uint16_t* x, int64_t x_stride, uint16_t* out, const int64_t* positions,
                                 const uint16_t* cos, const uint16_t* sin, int64_t tokens, int heads, int head_dim) {
    const int half = head_dim / 2;
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t* c = cos + positions[t] * head_dim;
        const uint16_t* s = sin + positions[t] * head_dim;
        for (int h = 0; h < heads; h++) {
            const uint16_t* xh = x + t * x_stride + (int64_t)h * head_dim;
            uint16_t* oh = out + (t * heads + h) * (int64_t)head_dim;
            for (int i = 0; i < half; i += 8) {
                const __m256 a = bf16x8_in(xh + i), b = bf16x8_in(xh + i + half);
                const __m256 lo = _mm256_add_ps(round_bf16_8(_mm256_mul_ps(a, bf16x8_in(c + i))),
                                                round_bf16_8(_mm256_mul_ps(_mm256_xor_ps(b, sign), bf16x8_in(s + i))));
                const __m256 hi = _mm256_add_ps(round_bf16_8(_mm256_mul_ps(b, bf16x8_in(c + i + half))),
                                                round_bf16_8(_mm256_mul_ps(a, bf16x8_in(s + i + half))));
                _mm_storeu_si128((__m128i*)(oh + i), bf16x8_out(lo));
                _mm_storeu_si128((__m128i*)(oh + i + half), bf16x8_out(hi));
            }
        }
    }
}
#endif

void rotary_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride, uint16_t* q_out,
                 uint16_t* k_out, const int64_t* positions, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
                 int heads, int kv_heads, int head_dim) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if (head_dim % 32 == 0) {
        rotary_bf16_one_avx512(q, q_stride, q_out, positions, cos, sin, tokens, heads, head_dim);
        rotary_bf16_one_avx512(k, k_stride, k_out, positions, cos, sin, tokens, kv_heads, head_dim);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 16 == 0) {
        rotary_bf16_one_avx2(q, q_stride, q_out, positions, cos, sin, tokens, heads, head_dim);
        rotary_bf16_one_avx2(k, k_stride, k_out, positions, cos, sin, tokens, kv_heads, head_dim);
        return;
    }
#endif
    rotary_bf16_generic(q, q_stride, k, k_stride, q_out, k_out, positions, cos, sin, tokens, heads, kv_heads,
                        head_dim);
}
DEFINE_SILU_MUL(silu_mul_bf16_generic, uint16_t, BF16_IN, BF16_ROUND, BF16_OUT)

/* On AVX-512 BF16 builds every width runs the vector form (avx512_bf16.h's exp, masked at a row's
 * end), on AVX2 builds avx2_bf16.h's 8-lane twin: the GEMM that fuses this pass
 * (gemm_panel_silu_bf16) computes the same bits with it. */
void silu_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t width) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* gate = x + r * 2 * width;
        const uint16_t* up = gate + width;
        uint16_t* o = out + r * width;
        for (int64_t i = 0; i < width; i += 16) {
            const __mmask16 keep = width - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - i)) - 1);
            const __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, gate + i)), 16));
            const __m512 u = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, up + i)), 16));
            _mm256_mask_storeu_epi16(o + i, keep, (__m256i)_mm512_cvtneps_pbh(silu_mul_ps(g, u)));
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* gate = x + r * 2 * width;
        const uint16_t* up = gate + width;
        uint16_t* o = out + r * width;
        for (int64_t i = 0; i < width; i += 8) {
            if (width - i >= 8) {
                _mm_storeu_si128((__m128i*)(o + i), bf16x8_out(silu_mul8(bf16x8_in(gate + i), bf16x8_in(up + i))));
            } else {  /* a row's last few values, through a full vector of 8 */
                uint16_t g8[8] = {0}, u8[8] = {0}, o8[8];
                memcpy(g8, gate + i, sizeof(uint16_t) * (width - i));
                memcpy(u8, up + i, sizeof(uint16_t) * (width - i));
                _mm_storeu_si128((__m128i*)o8, bf16x8_out(silu_mul8(bf16x8_in(g8), bf16x8_in(u8))));
                memcpy(o + i, o8, sizeof(uint16_t) * (width - i));
            }
        }
    }
#else
    silu_mul_bf16_generic(x, out, rows, width);
#endif
}

/* This step's keys and values into their cache slots (any dtype: rows of row_bytes; the source
 * rows may be strided views). -1 where a slot is out of range (nothing is written then). */
int write_kv(const char* k, int64_t k_stride, const char* v, int64_t v_stride, char* k_cache, char* v_cache,
             const int64_t* slots, int64_t tokens, int64_t row_bytes, int64_t num_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(k_cache + slots[t] * row_bytes, k + t * k_stride, row_bytes);
        memcpy(v_cache + slots[t] * row_bytes, v + t * v_stride, row_bytes);
    }
    return 0;
}

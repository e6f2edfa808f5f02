/* Decode attention over a paged KV cache, for CPUs: one query token per sequence.
 *
 * Reads each sequence's keys and values straight from its blocks (no gather, no padding, never a
 * slot past the sequence's end). One OpenMP task per sequence sweeps its blocks front to back, all
 * kv heads at once, so every block is read as one contiguous run (what the prefetcher wants; the
 * cache is far larger than the CPU's caches). Two passes: softmax needs the scores' maximum.
 * Compiled on first use by cpu_kernels.py for the machine it runs on.
 *
 * Layouts: q/out [num_seqs, num_heads, head_dim]; k_cache/v_cache [num_blocks, block_size,
 * num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int64; seq_lens [num_seqs] int64.
 * Query head j uses kv head j / (num_heads / num_kv_heads).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                          \
void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,               \
          const int64_t* seq_lens, T* out, int num_seqs, int num_heads, int num_kv_heads,            \
          int head_dim, int block_size, int max_blocks, float scale) {                               \
    const int group = num_heads / num_kv_heads;                                                      \
    const int64_t row = (int64_t)num_kv_heads * head_dim;  /* one token slot: all kv heads */        \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                                 \
    for (int s = 0; s < num_seqs; s++) {                                                             \
        const int64_t len = seq_lens[s];                                                             \
        const int64_t* table = block_tables + (int64_t)s * max_blocks;                               \
        /* scratch: scores [num_heads, len], q as floats and the accumulator [num_heads, head_dim] */ \
        float* scores = malloc(sizeof(float) * ((int64_t)num_heads * len + 2 * num_heads * head_dim)); \
        float* qf = scores + (int64_t)num_heads * len;                                               \
        float* acc = qf + num_heads * head_dim;                                                      \
        for (int j = 0; j < num_heads * head_dim; j++)                                               \
            qf[j] = LOAD(q[(int64_t)s * num_heads * head_dim + j]) * scale;                          \
        for (int64_t t = 0; t < len; t++) {                                                          \
            const T* k = k_cache + (table[t / block_size] * block_size + t % block_size) * row;      \
            for (int j = 0; j < num_heads; j++) {                                                    \
                const T* kh = k + (j / group) * head_dim;                                            \
                const float* qj = qf + j * head_dim;                                                 \
                float dot = 0.f;                                                                     \
                _Pragma("omp simd reduction(+:dot)")                                                 \
                for (int d = 0; d < head_dim; d++) dot += qj[d] * LOAD(kh[d]);                       \
                scores[j * len + t] = dot;                                                           \
            }                                                                                        \
        }                                                                                            \
        for (int j = 0; j < num_heads; j++) {                                                        \
            float* sj = scores + j * len;                                                            \
            float mx = sj[0];                                                                        \
            for (int64_t t = 1; t < len; t++) mx = sj[t] > mx ? sj[t] : mx;                          \
            float sum = 0.f;                                                                         \
            _Pragma("omp simd reduction(+:sum)")                                                     \
            for (int64_t t = 0; t < len; t++) { sj[t] = expf(sj[t] - mx); sum += sj[t]; }            \
            const float inv = 1.f / sum;                                                             \
            for (int64_t t = 0; t < len; t++) sj[t] *= inv;                                          \
        }                                                                                            \
        memset(acc, 0, sizeof(float) * num_heads * head_dim);                                        \
        for (int64_t t = 0; t < len; t++) {                                                          \
            const T* v = v_cache + (table[t / block_size] * block_size + t % block_size) * row;      \
            for (int j = 0; j < num_heads; j++) {                                                    \
                const T* vh = v + (j / group) * head_dim;                                            \
                const float p = scores[j * len + t];                                                 \
                float* aj = acc + j * head_dim;                                                      \
                _Pragma("omp simd")                                                                  \
                for (int d = 0; d < head_dim; d++) aj[d] += p * LOAD(vh[d]);                         \
            }                                                                                        \
        }                                                                                            \
        for (int j = 0; j < num_heads * head_dim; j++)                                               \
            out[(int64_t)s * num_heads * head_dim + j] = STORE(acc[j]);                              \
        free(scores);                                                                                \
    }                                                                                                \
}

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
#define BF16_LOAD(x) bf16_to_f32(x)
#define BF16_STORE(x) f32_to_bf16(x)
#define F16_LOAD(x) ((float)(x))
#define F16_STORE(x) ((_Float16)(x))

DEFINE_KERNEL(paged_decode_f32, float, F32_LOAD, F32_STORE)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, BF16_LOAD, BF16_STORE)
DEFINE_KERNEL(paged_decode_f16, _Float16, F16_LOAD, F16_STORE)

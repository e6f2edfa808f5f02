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

/* each of `rows` rows of `len` scores replaced by its softmax (the vector kernels' shared step) */
static inline void softmax_rows(float* scores, int rows, int64_t len) {
    for (int j = 0; j < rows; j++) {
        float* sj = scores + j * len;
        float mx = sj[0];
        for (int64_t t = 1; t < len; t++) mx = sj[t] > mx ? sj[t] : mx;
        float sum = 0.f;
        for (int64_t t = 0; t < len; t++) { sj[t] = expf(sj[t] - mx); sum += sj[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; t++) sj[t] *= inv;
    }
}

#define F32_LOAD(x) (x)
#define F32_STORE(x) (x)
#define BF16_LOAD(x) bf16_to_f32(x)
#define BF16_STORE(x) f32_to_bf16(x)
#define F16_LOAD(x) ((float)(x))
#define F16_STORE(x) ((_Float16)(x))

DEFINE_KERNEL(paged_decode_f32_generic, float, F32_LOAD, F32_STORE)
DEFINE_KERNEL(paged_decode_f16, _Float16, F16_LOAD, F16_STORE)
DEFINE_KERNEL(paged_decode_bf16_generic, uint16_t, BF16_LOAD, BF16_STORE)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

/* bf16 with AVX-512 BF16, for head_dim a multiple of 32 (up to 256) and up to 16 query heads per kv
 * head. One task per (sequence, kv head): its query heads' q stay in registers while the keys of
 * that kv head stream past once; each 32-value chunk of a dot product is one vdpbf16ps (bf16
 * products are exact in float32, the sums float32). The values are read once per task too, the
 * group's accumulators in registers for each 64-value slice of the head. Scale and softmax in
 * float32, the output rounded to bf16 (nearest even). Same results as the generic loop up to the
 * order of float32 sums. */
#define MAX_CHUNKS 8  /* head_dim / 32 */
#define MAX_GROUP 16
#define PREFETCH 16  /* tokens ahead */
#define EARLY_VALUES_BYTES (256 * 1024)  /* one task's values fetched during its key pass, at most */

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __attribute__((always_inline)) void decode_task_bf16(
        const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* table, int64_t len,
        uint16_t* out, int g, int group, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
        float* scores) {
    const int64_t row = (int64_t)num_kv_heads * head_dim;
    const int chunks = head_dim / 32;
    /* each token's element offset in the caches, block by block (no division per token) */
    int64_t* slot = (int64_t*)(scores + (int64_t)group * len);
    for (int64_t b = 0, t = 0; t < len; b++)
        for (int64_t i = 0; i < block_size && t < len; i++, t++) slot[t] = (table[b] * block_size + i) * row + g * head_dim;
    __m512bh qv[MAX_GROUP][MAX_CHUNKS];
    for (int j = 0; j < group; j++)
        for (int c = 0; c < chunks; c++)
            qv[j][c] = (__m512bh)_mm512_loadu_si512(q + (int64_t)(g * group + j) * head_dim + c * 32);
    /* scores[j * len + t] = scale * q_j . k_t. The keys' loads leave time to spare: the values are
     * requested during this pass too (when they fit the L2 cache with room to spare), so the
     * second pass reads them from cache; 64 sequences x ~85 tokens ran 16% faster that way,
     * x 300 tokens 37%. */
    const int early_values = len * head_dim * (int64_t)sizeof(uint16_t) <= EARLY_VALUES_BYTES;
    for (int64_t t = 0; t < len; t++) {
        const uint16_t* k = k_cache + slot[t];
        if (t + PREFETCH < len)  /* blocks lie anywhere: fetch ahead what the prefetcher cannot guess */
            for (int c = 0; c < chunks; c++) _mm_prefetch((const char*)(k_cache + slot[t + PREFETCH] + c * 32), _MM_HINT_T1);
        if (early_values)  /* and this token's values, for the second pass to find in L2 */
            for (int c = 0; c < chunks; c++) _mm_prefetch((const char*)(v_cache + slot[t] + c * 32), _MM_HINT_T1);
        __m512bh kv[MAX_CHUNKS];
        for (int c = 0; c < chunks; c++) kv[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
        for (int j = 0; j < group; j++) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++) acc = _mm512_dpbf16_ps(acc, qv[j][c], kv[c]);
            scores[j * len + t] = hsum(acc) * scale;
        }
    }
    softmax_rows(scores, group, len);
    /* out_j = sum_t p[j, t] v_t, 64 values of the head at a time (4 registers per query head) */
    for (int d0 = 0; d0 < head_dim; d0 += 64) {
        __m512 acc[MAX_GROUP][4];
        const int parts = head_dim - d0 >= 64 ? 4 : (head_dim - d0) / 16;
        for (int j = 0; j < group; j++)
            for (int p = 0; p < parts; p++) acc[j][p] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            const uint16_t* v = v_cache + slot[t] + d0;
            if (t + PREFETCH < len)
                for (int p = 0; p < parts; p += 2) _mm_prefetch((const char*)(v_cache + slot[t + PREFETCH] + d0 + p * 16), _MM_HINT_T0);
            __m512 vf[4];
            for (int p = 0; p < parts; p++)
                vf[p] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + p * 16))), 16));
            for (int j = 0; j < group; j++) {
                const __m512 pj = _mm512_set1_ps(scores[j * len + t]);
                for (int p = 0; p < parts; p++) acc[j][p] = _mm512_fmadd_ps(pj, vf[p], acc[j][p]);
            }
        }
        for (int j = 0; j < group; j++)
            for (int p = 0; p < parts; p++)
                _mm256_storeu_si256((__m256i*)(out + (int64_t)(g * group + j) * head_dim + d0 + p * 16),
                                    (__m256i)_mm512_cvtneps_pbh(acc[j][p]));
    }
}

void paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int64_t* block_tables, const int64_t* seq_lens, uint16_t* out, int num_seqs,
                       int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale) {
    const int group = num_heads / num_kv_heads;
    if (head_dim % 32 != 0 || head_dim / 32 > MAX_CHUNKS || group > MAX_GROUP) {
        paged_decode_bf16_generic(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads,
                                  num_kv_heads, head_dim, block_size, max_blocks, scale);
        return;
    }
    const int tasks = num_seqs * num_kv_heads;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < tasks; task++) {
        const int s = task / num_kv_heads, g = task % num_kv_heads;
        const int64_t len = seq_lens[s];
        float* scores = malloc((sizeof(float) * group + sizeof(int64_t)) * len);  /* + token offsets */
        const uint16_t* qs = q + (int64_t)s * num_heads * head_dim;
        const int64_t* table = block_tables + (int64_t)s * max_blocks;
        uint16_t* os = out + (int64_t)s * num_heads * head_dim;
        /* common shapes with compile-time sizes, so q, keys and accumulators stay in registers */
#define TASK(GROUP, DIM) decode_task_bf16(qs, k_cache, v_cache, table, len, os, g, GROUP, num_heads, num_kv_heads, \
                                          DIM, block_size, scale, scores)
        if (head_dim == 64 && group == 1) TASK(1, 64);
        else if (head_dim == 64 && group == 2) TASK(2, 64);
        else if (head_dim == 64 && group == 3) TASK(3, 64);
        else if (head_dim == 64 && group == 4) TASK(4, 64);
        else if (head_dim == 128 && group == 1) TASK(1, 128);
        else if (head_dim == 128 && group == 2) TASK(2, 128);
        else if (head_dim == 128 && group == 4) TASK(4, 128);
        else if (head_dim == 128 && group == 8) TASK(8, 128);
        else TASK(group, head_dim);
#undef TASK
        free(scores);
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "avx2_bf16.h"

/* AVX2 and FMA, float32 caches (and bf16 ones on CPUs without AVX-512 BF16), for head_dim a multiple
 * of 8 (up to 256) and up to 16 query heads per kv head: the AVX-512 bf16 kernel's plan (one task
 * per (sequence, kv head), keys then values streamed once, blocks fetched ahead) in 8-wide float32
 * vectors, bf16 values widened as they load. Same results as the generic loop up to the order of
 * float32 sums (and bf16's output rounding). */
#define AVX2_MAX_GROUP 16
#define AVX2_PREFETCH 8  /* tokens ahead */
#define AVX2_EARLY_VALUES_BYTES (256 * 1024)

static inline float hsum8_attn(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 values at element offset i of a float32 (bf16 = 0) or bf16 (bf16 = 1) array, as float32 */
static inline __attribute__((always_inline)) __m256 load8(const void* base, int64_t i, const int bf16) {
    return bf16 ? bf16x8_in((const uint16_t*)base + i) : _mm256_loadu_ps((const float*)base + i);
}

static inline __attribute__((always_inline)) void decode_task_avx2(
        const int bf16, const void* q, const void* k_cache, const void* v_cache, const int64_t* table, int64_t len,
        void* out, int g, int group, int num_kv_heads, int head_dim, int block_size, float scale, float* scores) {
    const int64_t row = (int64_t)num_kv_heads * head_dim;
    const int esize = bf16 ? 2 : 4, vecs = head_dim / 8;
    const char *kc = (const char*)k_cache, *vc = (const char*)v_cache;
    int64_t* slot = (int64_t*)(scores + (int64_t)group * len);
    for (int64_t b = 0, t = 0; t < len; b++)
        for (int64_t i = 0; i < block_size && t < len; i++, t++) slot[t] = (table[b] * block_size + i) * row + g * head_dim;
    /* this kv head's query heads, one after another, as float32 (widened once, not per key) */
    float* qf = (float*)(slot + len);
    for (int j = 0; j < group * head_dim; j += 8)
        _mm256_storeu_ps(qf + j, load8(q, (int64_t)g * group * head_dim + j, bf16));
    const int early_values = len * head_dim * (int64_t)esize <= AVX2_EARLY_VALUES_BYTES;
    for (int64_t t = 0; t < len; t++) {
        if (t + AVX2_PREFETCH < len)
            for (int c = 0; c < head_dim * esize; c += 64) _mm_prefetch(kc + slot[t + AVX2_PREFETCH] * esize + c, _MM_HINT_T1);
        if (early_values)
            for (int c = 0; c < head_dim * esize; c += 64) _mm_prefetch(vc + slot[t] * esize + c, _MM_HINT_T1);
        for (int j = 0; j < group; j++) {
            const float* qj = qf + (int64_t)j * head_dim;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int c = 0;
            for (; c + 2 <= vecs; c += 2) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + c * 8), load8(k_cache, slot[t] + c * 8, bf16), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + c * 8 + 8), load8(k_cache, slot[t] + c * 8 + 8, bf16), a1);
            }
            if (c < vecs) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + c * 8), load8(k_cache, slot[t] + c * 8, bf16), a0);
            scores[j * len + t] = hsum8_attn(_mm256_add_ps(a0, a1)) * scale;
        }
    }
    softmax_rows(scores, group, len);
    /* out_j = sum_t p[j, t] v_t, 32 values of the head at a time (4 registers per query head) */
    for (int d0 = 0; d0 < head_dim; d0 += 32) {
        const int parts = head_dim - d0 >= 32 ? 4 : (head_dim - d0) / 8;
        __m256 acc[AVX2_MAX_GROUP][4];
        for (int j = 0; j < group; j++)
            for (int p = 0; p < parts; p++) acc[j][p] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            if (t + AVX2_PREFETCH < len) _mm_prefetch(vc + (slot[t + AVX2_PREFETCH] + d0) * esize, _MM_HINT_T0);
            __m256 v[4];
            for (int p = 0; p < parts; p++) v[p] = load8(v_cache, slot[t] + d0 + p * 8, bf16);
            for (int j = 0; j < group; j++) {
                const __m256 pj = _mm256_set1_ps(scores[j * len + t]);
                for (int p = 0; p < parts; p++) acc[j][p] = _mm256_fmadd_ps(pj, v[p], acc[j][p]);
            }
        }
        for (int j = 0; j < group; j++)
            for (int p = 0; p < parts; p++) {
                const int64_t at = (int64_t)(g * group + j) * head_dim + d0 + p * 8;
                if (bf16) _mm_storeu_si128((__m128i*)((uint16_t*)out + at), bf16x8_out(acc[j][p]));
                else _mm256_storeu_ps((float*)out + at, acc[j][p]);
            }
    }
}

static inline __attribute__((always_inline)) void paged_decode_avx2(
        const int bf16, const void* q, const void* k_cache, const void* v_cache, const int64_t* block_tables,
        const int64_t* seq_lens, void* out, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
        int block_size, int max_blocks, float scale) {
    const int group = num_heads / num_kv_heads, esize = bf16 ? 2 : 4;
    const int tasks = num_seqs * num_kv_heads;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < tasks; task++) {
        const int s = task / num_kv_heads, g = task % num_kv_heads;
        const int64_t len = seq_lens[s];
        /* scores [group, len], token offsets [len], the group's queries as float32 [group, head_dim] */
        float* scores = malloc((sizeof(float) * group + sizeof(int64_t)) * len + sizeof(float) * group * head_dim);
        const char* qs = (const char*)q + (int64_t)s * num_heads * head_dim * esize;
        const int64_t* table = block_tables + (int64_t)s * max_blocks;
        char* os = (char*)out + (int64_t)s * num_heads * head_dim * esize;
#define TASK(GROUP, DIM) decode_task_avx2(bf16, qs, k_cache, v_cache, table, len, os, g, GROUP, num_kv_heads, DIM, \
                                          block_size, scale, scores)
        if (head_dim == 64 && group == 1) TASK(1, 64);
        else if (head_dim == 64 && group == 3) TASK(3, 64);
        else if (head_dim == 64 && group == 4) TASK(4, 64);
        else if (head_dim == 128 && group == 1) TASK(1, 128);
        else if (head_dim == 128 && group == 4) TASK(4, 128);
        else if (head_dim == 128 && group == 8) TASK(8, 128);
        else TASK(group, head_dim);
#undef TASK
        free(scores);
    }
}

static int avx2_takes(int num_heads, int num_kv_heads, int head_dim) {
    return head_dim % 8 == 0 && head_dim <= 256 && num_heads / num_kv_heads <= AVX2_MAX_GROUP;
}

void paged_decode_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* block_tables,
                      const int64_t* seq_lens, float* out, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                      int block_size, int max_blocks, float scale) {
    if (avx2_takes(num_heads, num_kv_heads, head_dim))
        paged_decode_avx2(0, q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                          head_dim, block_size, max_blocks, scale);
    else
        paged_decode_f32_generic(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                                 head_dim, block_size, max_blocks, scale);
}
#else
void paged_decode_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* block_tables,
                      const int64_t* seq_lens, float* out, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                      int block_size, int max_blocks, float scale) {
    paged_decode_f32_generic(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                             head_dim, block_size, max_blocks, scale);
}
#endif

#if !(defined(__AVX512BF16__) && defined(__AVX512F__))
/* bf16 without AVX-512 BF16: the AVX2 kernel above where it takes the shape, else the generic loop */
void paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int64_t* block_tables, const int64_t* seq_lens, uint16_t* out, int num_seqs,
                       int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale) {
#if defined(__AVX2__) && defined(__FMA__)
    if (avx2_takes(num_heads, num_kv_heads, head_dim)) {
        paged_decode_avx2(1, q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                          head_dim, block_size, max_blocks, scale);
        return;
    }
#endif
    paged_decode_bf16_generic(q, k_cache, v_cache, block_tables, seq_lens, out, num_seqs, num_heads,
                              num_kv_heads, head_dim, block_size, max_blocks, scale);
}
#endif

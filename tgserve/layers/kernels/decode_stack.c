/* A Llama-family decoder's whole stack of layers for one decode step of a few sequences, bf16, on
 * CPUs with AVX-512 BF16 (or AVX2, where every linear has panels): one call instead of ~40 PyTorch ops and Python calls per layer, which at
 * one to four rows cost as much as the matmuls themselves. It composes the kernels the layers use
 * on their own, in the same order and with the same rounding, so the result is bit for bit that
 * of the layer-by-layer path (tests/layers/test_decode_stack.py):
 *
 *   h = rms_norm(x); qkv = h W_qkv; q, k = rotary(q, k); cache[slot] = k, v;
 *   x = x + attention(q) W_o; h = rms_norm(x); x = x + (silu(h W_gate) * (h W_up)) W_down
 *
 * Each layer's pointers (12 of them: input norm, qkv, o, post-attention norm, gate_up and down
 * weights — plain row-major, or 0 — then its key and value caches, then the qkv, o, gate_up and down
 * weights packed in 64-column panels, or 0) come in one int64 array. A linear with panels runs the
 * panel GEMM (the gate/up projection with its SiLU fused), one without them the small-batch kernel
 * on its plain weight, up to four rows (what the layers choose). x is updated in place; the final
 * norm stays with the model.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void linear_small_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int m, int n, int k);
void rms_norm_bf16(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t rows, int64_t hidden, float eps);
void rotary_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride, uint16_t* q_out,
                 uint16_t* k_out, const int64_t* positions, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
                 int heads, int kv_heads, int head_dim);
void silu_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t width);
void gemm_panel_bf16(const uint16_t* x, const uint16_t* panels, const uint16_t* bias, uint16_t* y, int m, int n,
                     int k);
void gemm_panel_silu_bf16(const uint16_t* x, const uint16_t* panels, uint16_t* scratch, uint16_t* y, int m, int n,
                          int k);
void paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int64_t* block_tables, const int64_t* seq_lens, uint16_t* out, int num_seqs,
                       int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks, float scale);

static inline float bf_in(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf_out(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#define SMALL_ROWS 4  /* linear_small.c's MAX_ROWS */

/* y = x W^T as the layer computes it: on its panels if it has them, else (at most SMALL_ROWS rows)
 * on its plain weight */
static void linear(const uint16_t* x, const uint16_t* plain, const uint16_t* panels, uint16_t* y, int m, int n, int k) {
    if (panels) gemm_panel_bf16(x, panels, NULL, y, m, n, k);
    else linear_small_bf16(x, plain, NULL, y, m, n, k);
}

static void add_into(uint16_t* x, const uint16_t* y, int64_t n) {  /* x = x + y, as a bf16 add rounds */
    for (int64_t i = 0; i < n; i++) x[i] = bf_out(bf_in(x[i]) + bf_in(y[i]));
}

int llama_decode_stack_bf16(const int64_t* pointers, int layers, uint16_t* x, int m, int hidden, int heads,
                             int kv_heads, int head_dim, int intermediate, float eps, const int64_t* positions,
                             const uint16_t* cos, const uint16_t* sin, const int64_t* slots,
                             const int64_t* block_tables, const int64_t* seq_lens, int max_blocks, int block_size,
                             float scale) {
    if (m > SMALL_ROWS)  /* past the small kernel's rows every linear needs its panels */
        for (int l = 0; l < layers; l++)
            for (int i = 8; i < 12; i++)
                if (pointers[12 * l + i] == 0) return -1;
    const int q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    uint16_t* h = malloc(sizeof(uint16_t) * (size_t)m * (2 * hidden + qkv_size + 2 * q_size + kv_size
                                                         + 3 * intermediate));
    uint16_t* qkv = h + (size_t)m * hidden;
    uint16_t* q_rot = qkv + (size_t)m * qkv_size;
    uint16_t* k_rot = q_rot + (size_t)m * q_size;
    uint16_t* attended = k_rot + (size_t)m * kv_size;
    uint16_t* gate_up = attended + (size_t)m * q_size;
    uint16_t* act = gate_up + (size_t)m * 2 * intermediate;
    uint16_t* y = act + (size_t)m * intermediate;
    for (int l = 0; l < layers; l++) {
        const int64_t* p = pointers + 12 * l;
        const uint16_t *pn_qkv = (const uint16_t*)p[8], *pn_o = (const uint16_t*)p[9];
        const uint16_t *pn_gate_up = (const uint16_t*)p[10], *pn_down = (const uint16_t*)p[11];
        const uint16_t *in_norm = (const uint16_t*)p[0], *w_qkv = (const uint16_t*)p[1], *w_o = (const uint16_t*)p[2];
        const uint16_t *post_norm = (const uint16_t*)p[3], *w_gate_up = (const uint16_t*)p[4];
        const uint16_t* w_down = (const uint16_t*)p[5];
        uint16_t *k_cache = (uint16_t*)p[6], *v_cache = (uint16_t*)p[7];

        rms_norm_bf16(x, in_norm, h, m, hidden, eps);
        linear(h, w_qkv, pn_qkv, qkv, m, qkv_size, hidden);
        rotary_bf16(qkv, qkv_size, qkv + q_size, qkv_size, q_rot, k_rot, positions, cos, sin, m, heads, kv_heads,
                    head_dim);
        for (int i = 0; i < m; i++) {  /* this step's keys and values into their cache slots */
            memcpy(k_cache + slots[i] * kv_size, k_rot + (size_t)i * kv_size, sizeof(uint16_t) * kv_size);
            memcpy(v_cache + slots[i] * kv_size, qkv + (size_t)i * qkv_size + q_size + kv_size,
                   sizeof(uint16_t) * kv_size);
        }
        paged_decode_bf16(q_rot, k_cache, v_cache, block_tables, seq_lens, attended, m, heads, kv_heads, head_dim,
                          block_size, max_blocks, scale);
        linear(attended, w_o, pn_o, y, m, hidden, q_size);
        add_into(x, y, (int64_t)m * hidden);

        rms_norm_bf16(x, post_norm, h, m, hidden, eps);
        if (!pn_gate_up || intermediate % 64) {
            linear(h, w_gate_up, pn_gate_up, gate_up, m, 2 * intermediate, hidden);
            silu_mul_bf16(gate_up, act, m, intermediate);
        } else {  /* the projection and its SiLU in one call (what the layer runs at these rows) */
            gemm_panel_silu_bf16(h, pn_gate_up, gate_up, act, m, 2 * intermediate, hidden);
        }
        linear(act, w_down, pn_down, y, m, hidden, intermediate);
        add_into(x, y, (int64_t)m * hidden);
    }
    free(h);
    return 0;
}

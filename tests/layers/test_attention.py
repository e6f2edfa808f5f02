"""PagedAttention over a paged, shuffled KV cache equals plain causal attention on contiguous K/V.

Each scenario builds synthetic Sequences that own shuffled, non-contiguous blocks, writes the K/V
of their already-computed tokens into the cache by hand, turns a StepPlan into inputs with the
real `build_inputs`, runs one PagedAttention step and compares every query row with SDPA over the
sequence's contiguous keys (GQA expanded with repeat_interleave).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgserve.engine.inputs import build_inputs
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import ScheduledSeq, StepPlan
from tgserve.engine.sequence import Sequence
from tgserve.layers.attention import NULL_BLOCK, PagedAttention
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest

BLOCK = 4
NUM_BLOCKS = 48
HEAD_DIM = 8
SCALE = HEAD_DIM**-0.5
CPU = torch.device("cpu")
HEAD_LAYOUTS = [(4, 2), (4, 4), (4, 1)]  # (query heads, kv heads): GQA, MHA, MQA


@pytest.fixture(autouse=True, params=["native-kernel", "torch-fallback"])
def decode_path(request, monkeypatch):
    """Every scenario runs on both decode paths: the native CPU kernel and the PyTorch fallback."""
    from tgserve.layers import cpu_kernels

    if request.param == "torch-fallback":
        monkeypatch.setattr(cpu_kernels, "paged_decode", lambda *args: None)
    else:
        assert cpu_kernels._library() is not None, "the native kernel must build on this machine"
    return request.param


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, sliding_window=None,
              alibi_slopes=None, logit_softcap=None) -> torch.Tensor:
    """Causal attention of q (positions context..) over contiguous k/v: [n, heads * head_dim],
    with the options written out the way their models compute them (eager attention)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n, total = q.shape[0], k.shape[0]
    query_pos, key_pos = context + torch.arange(n), torch.arange(total)
    mask = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    scores = (q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2)) * SCALE  # [heads, n, total]
    if logit_softcap is not None:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    if alibi_slopes is not None:
        scores = scores + alibi_slopes[:, None, None] * key_pos[None, None, :]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights @ v.transpose(0, 1)).transpose(0, 1).reshape(n, -1)


def make_seq(request_id: str, num_tokens: int, computed: int, block_ids: list[int]) -> Sequence:
    seq = Sequence(AddRequest(request_id, list(range(1, num_tokens + 1)), SamplingParams(),
                              StoppingParams(max_new_tokens=1), 0.0))
    seq.num_computed_tokens = computed
    seq.block_ids = list(block_ids)
    return seq


def run_step(specs, heads, kv_heads, *, seed=0, k_cache=None, v_cache=None, options=None, dtype=torch.float32):
    """specs: (context, new, pending) per sequence, in plan order; pending = prompt tokens left after
    this chunk. Checks every output row (against float32 attention over the same values, within
    the dtype's rounding) and the cache writes; returns (inputs, output, k_cache)."""
    options = options or {}
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK, kv_heads, HEAD_DIM)
    k_cache = torch.zeros(shape, dtype=dtype) if k_cache is None else k_cache
    v_cache = torch.zeros(shape, dtype=dtype) if v_cache is None else v_cache
    attn = PagedAttention(heads, kv_heads, HEAD_DIM, SCALE, **options)
    attn.bind_cache(k_cache, v_cache)
    free = (torch.randperm(NUM_BLOCKS - 1, generator=g) + 1).tolist()  # never the null block

    items, data = [], []
    for i, (context, new, pending) in enumerate(specs):
        total = context + new
        blocks = [free.pop() for _ in range(-(-total // BLOCK))]
        seq = make_seq(f"s{i}", total + pending, context, blocks)
        k = torch.randn(total, kv_heads, HEAD_DIM, generator=g).to(dtype)
        v = torch.randn(total, kv_heads, HEAD_DIM, generator=g).to(dtype)
        q = torch.randn(new, heads, HEAD_DIM, generator=g).to(dtype)
        for p in range(context):  # the sequence's earlier tokens are already cached
            k_cache[blocks[p // BLOCK], p % BLOCK] = k[p]
            v_cache[blocks[p // BLOCK], p % BLOCK] = v[p]
        items.append(ScheduledSeq(seq, new, pending == 0))
        data.append((seq, context, q, k, v))
    plan = StepPlan(tuple(items), sum(n for _, n, _ in specs))
    inputs = build_inputs(plan, BLOCK, CPU)

    # documented flat order: one-token rows first, then prefill chunks, each in plan order
    order = [i for i, (_, n, _) in enumerate(specs) if n == 1] + [i for i, (_, n, _) in enumerate(specs) if n > 1]
    expected_positions = torch.cat([torch.arange(data[i][1], data[i][1] + specs[i][1]) for i in order])
    assert torch.equal(inputs.positions, expected_positions)
    q_flat = torch.cat([data[i][2] for i in order])
    k_flat = torch.cat([data[i][3][data[i][1]:] for i in order])
    v_flat = torch.cat([data[i][4][data[i][1]:] for i in order])
    out = attn(q_flat, k_flat, v_flat, inputs.attn)

    assert out.shape == (q_flat.shape[0], heads * HEAD_DIM)
    row = 0
    for i in order:
        seq, context, q, k, v = data[i]
        n = q.shape[0]
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[row:row + n].float(), reference(q.float(), k.float(), v.float(), context,
                                                                       **options),
                                   rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f"sequence {i} (context {context}, new {n}): {m}")
        row += n
        for p in range(context + n):  # every token's K/V sits in its own slot afterwards
            b = seq.block_ids[p // BLOCK]
            assert torch.equal(k_cache[b, p % BLOCK], k[p]) and torch.equal(v_cache[b, p % BLOCK], v[p])
    return inputs, out, k_cache


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_decode_rows_of_different_lengths_match_causal_attention(heads, kv_heads):
    # total lengths 1 (a one-token sequence), a full block, mid-block ends, several blocks
    lengths = [1, 3, 4, 5, 7, 13, 16, 22]
    inputs, _, k_cache = run_step([(n - 1, 1, 0) for n in lengths], heads, kv_heads)
    assert inputs.attn.num_decode == len(lengths) and not inputs.attn.prefills
    assert torch.count_nonzero(k_cache[NULL_BLOCK]) == 0  # padding points at the null block, never written


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_prefill_chunks_without_context_match_causal_attention(heads, kv_heads):
    inputs, _, _ = run_step([(0, 7, 0), (0, 4, 0), (0, 13, 0), (0, 2, 0)], heads, kv_heads)
    assert inputs.attn.num_decode == 0
    assert [c.context_len for c in inputs.attn.prefills] == [0, 0, 0, 0]


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_chunked_prefill_continuing_cached_tokens_matches_causal_attention(heads, kv_heads):
    # chunks that start mid-block, at a block edge, after one token; some leave prompt tokens pending
    specs = [(4, 5, 3), (3, 9, 0), (8, 2, 0), (1, 16, 7), (6, 3, 0)]
    inputs, _, _ = run_step(specs, heads, kv_heads)
    assert [c.context_len for c in inputs.attn.prefills] == [4, 3, 8, 1, 6]


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_mixed_step_of_decodes_and_prefills_matches_causal_attention(heads, kv_heads):
    # plan order interleaves them; build_inputs moves the one-token rows to the front
    specs = [(0, 6, 0), (9, 1, 0), (5, 7, 2), (0, 1, 0), (15, 1, 0), (2, 3, 0), (0, 9, 4)]
    inputs, _, _ = run_step(specs, heads, kv_heads, seed=3)
    assert inputs.attn.num_decode == 3
    # decodes at rows 0..2 (s1, s3, s4); chunks s0 rows 3-8, s2 9-15, s5 16-18, s6 19-27
    # sampling rows in plan order: s0, s1, s3, s4, s5 (s2 and s6 have prompt tokens left)
    assert inputs.sample_indices.tolist() == [8, 0, 1, 2, 18]


@pytest.mark.parametrize("scenario", ["prefills", "chunks", "mixed"])
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_bf16_steps_of_short_prompt_chunks_run_every_token_as_a_row_of_the_decode_kernel(heads, kv_heads, scenario,
                                                                                        decode_path, monkeypatch):
    """bf16, every prompt chunk at most ROW_CHUNK_TOKENS: one decode-kernel call per layer for the
    whole step, each prompt token a row over its sequence's keys up to its own position (chunks
    that continue a cache too); causal attention within bf16's rounding (on the PyTorch fallback,
    the per-chunk path). float32 steps keep the per-chunk path."""
    from tgserve.layers import cpu_kernels

    calls = []
    real = cpu_kernels.paged_decode
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    inputs, out, _ = run_step(SCENARIOS[scenario], heads, kv_heads, seed=7, dtype=torch.bfloat16)
    tokens = out.shape[0]
    assert inputs.attn.row_table.shape[0] == tokens and inputs.attn.row_lens.tolist() == [
        p + 1 for p in inputs.positions.tolist()]  # a token sees the keys up to its own position
    assert calls[:1] == [tokens]  # (the PyTorch fallback then attends chunk by chunk)
    if decode_path == "native-kernel":
        assert calls == [tokens]
    calls.clear()
    run_step(SCENARIOS[scenario], heads, kv_heads, seed=7)  # float32
    assert tokens not in calls


def test_a_long_prompt_chunk_keeps_the_per_chunk_path():
    from tgserve.engine.inputs import ROW_CHUNK_TOKENS

    inputs, _, _ = run_step([(0, ROW_CHUNK_TOKENS + 1, 0), (3, 1, 0)], 4, 2, dtype=torch.bfloat16)
    assert inputs.attn.row_table is None and inputs.attn.row_lens is None


ALIBI = torch.tensor([0.5, 0.25, 0.125, 0.0625])
OPTIONS = {
    "window-5": {"sliding_window": 5}, "window-1": {"sliding_window": 1}, "alibi": {"alibi_slopes": ALIBI},
    "softcap": {"logit_softcap": 1.5}, "all": {"sliding_window": 6, "alibi_slopes": ALIBI, "logit_softcap": 2.0},
}
SCENARIOS = {
    "decodes": [(n - 1, 1, 0) for n in (1, 3, 4, 5, 7, 13, 16, 22)],
    "prefills": [(0, 7, 0), (0, 4, 0), (0, 13, 0), (0, 2, 0)],
    "chunks": [(4, 5, 3), (3, 9, 0), (8, 2, 0), (1, 16, 7), (6, 3, 0)],
    "mixed": [(0, 6, 0), (9, 1, 0), (5, 7, 2), (0, 1, 0), (15, 1, 0), (2, 3, 0), (0, 9, 4)],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_attention_options_match_their_eager_definition(heads, kv_heads, option, scenario, decode_path):
    """Sliding window, ALiBi and soft-capping, on decodes, prefills, chunks continuing a cache and
    mixed steps (the explicit path, whichever decode path is set)."""
    run_step(SCENARIOS[scenario], heads, kv_heads, seed=5, options=OPTIONS[option])


def test_finite_garbage_in_unused_cache_slots_does_not_change_attention():
    # Freed blocks and the slots past a sequence's end in its last block keep whatever an earlier
    # sequence wrote. Masked keys get zero weight, so any finite garbage there is harmless.
    g = torch.Generator().manual_seed(7)
    shape = (NUM_BLOCKS, BLOCK, 2, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape, generator=g) * 1e6, torch.randn(shape, generator=g) * 1e6
    specs = [(0, 1, 0), (2, 1, 0), (5, 1, 0), (10, 1, 0), (0, 6, 0), (3, 6, 0), (9, 2, 0)]
    _, out, _ = run_step(specs, 4, 2, seed=1, k_cache=k_cache, v_cache=v_cache)
    assert torch.isfinite(out).all()


class _TwoAttentionLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(PagedAttention(4, 2, HEAD_DIM, SCALE) for _ in range(2))

    def attention_layers(self):
        return list(self.layers)


def test_runner_allocates_zeroed_kv_caches_even_over_freed_nan_memory():
    # A masked NaN still poisons attention (0 * NaN = NaN), so the runner must zero its caches:
    # free memory full of NaN first, so that an uninitialised allocation would likely reuse it.
    shape = (12, BLOCK, 2, HEAD_DIM)
    poison = [torch.full(shape, float("nan")) for _ in range(8)]
    del poison
    model = _TwoAttentionLayers()
    ModelRunner(model, 12, BLOCK, torch.float32, CPU)
    for layer in model.attention_layers():
        assert layer.k_cache.shape == shape and layer.v_cache.shape == shape
        assert torch.count_nonzero(layer.k_cache) == 0 and torch.count_nonzero(layer.v_cache) == 0


def test_decode_over_runner_caches_is_finite_after_nan_memory_was_freed():
    shape = (NUM_BLOCKS, BLOCK, 2, HEAD_DIM)
    poison = [torch.full(shape, float("nan")) for _ in range(8)]
    del poison
    model = _TwoAttentionLayers()
    ModelRunner(model, NUM_BLOCKS, BLOCK, torch.float32, CPU)
    layer = model.attention_layers()[0]
    # rows of 1, 2, 6 tokens: their last blocks end early and the short rows pad with the null block
    _, out, _ = run_step([(0, 1, 0), (1, 1, 0), (5, 1, 0)], 4, 2, k_cache=layer.k_cache, v_cache=layer.v_cache)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_decode_kernel_matches_the_torch_path_in_half_precision(dtype, decode_path):
    from tgserve.layers import cpu_kernels

    if decode_path != "native-kernel":
        pytest.skip("compares the two paths; runs once")
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK, 2, HEAD_DIM, generator=g).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK, 2, HEAD_DIM, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 9, 12], dtype=torch.long)
    table = (torch.randperm(NUM_BLOCKS - 1, generator=g)[:12] + 1).view(4, 3)
    q = torch.randn(4, 4, HEAD_DIM, generator=g).to(dtype)
    native = cpu_kernels.paged_decode(q, k_cache, v_cache, table, lens, SCALE)
    for row in range(4):
        slots = (table[row][:, None] * BLOCK + torch.arange(BLOCK)).view(-1)[: lens[row]]
        k = k_cache.view(-1, 2, HEAD_DIM)[slots].float()
        v = v_cache.view(-1, 2, HEAD_DIM)[slots].float()
        expected = reference(q[row:row + 1].float(), k, v, context=int(lens[row]) - 1)
        torch.testing.assert_close(native[row].float().reshape(1, -1), expected, atol=2e-2, rtol=2e-2)


def check_native_decode_kernel(dtype, head_dim, heads, kv_heads, num_seqs, lens, seed, per_seq, reference_dtype,
                               tolerance):
    """The native decode kernel against SDPA in reference_dtype, over 200 blocks of 16 in random order."""
    from tgserve.layers import cpu_kernels

    g = torch.Generator().manual_seed(seed)
    block, blocks = 16, 200
    k_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor(lens, dtype=torch.long)
    table = (torch.randperm(blocks - 1, generator=g)[:num_seqs * per_seq] + 1).view(num_seqs, per_seq)
    q = torch.randn(num_seqs, heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    native = cpu_kernels.paged_decode(q, k_cache, v_cache, table, lens, scale)
    if native is None:
        pytest.skip("no native kernels here")
    for row in range(num_seqs):
        slots = (table[row][:, None] * block + torch.arange(block)).view(-1)[: lens[row]]
        k = k_cache.view(-1, kv_heads, head_dim)[slots].to(reference_dtype).transpose(0, 1)
        v = v_cache.view(-1, kv_heads, head_dim)[slots].to(reference_dtype).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[row].to(reference_dtype)[:, None], k, v, scale=scale,
                                                  enable_gqa=heads != kv_heads)[:, 0]
        torch.testing.assert_close(native[row].to(reference_dtype), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("num_seqs", [4, 12])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 8, 2), (32, 4, 4), (96, 6, 1), (40, 4, 2)])
def test_native_bf16_decode_kernel_at_model_shapes(head_dim, heads, kv_heads, num_seqs):
    """The bf16 kernel's vectorised paths (head_dim a multiple of 32: SmolLM2's 64 with 3 query heads
    per kv head, 128, ...; a few sequences split by kv head, or many, one task each) and its generic
    path (40) against float32 attention, over blocks in random order and lengths that end inside a
    block, some longer than the kernel's prefetch reach."""
    check_native_decode_kernel(torch.bfloat16, head_dim, heads, kv_heads, num_seqs, [1, 17, 100, 3] * (num_seqs // 4),
                               seed=5, per_seq=7, reference_dtype=torch.float32, tolerance=1e-2)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 32, 8), (24, 8, 8), (40, 6, 1), (20, 4, 2)])
def test_native_float32_decode_kernel_at_model_shapes(head_dim, heads, kv_heads):
    """The float32 kernel's AVX2 path (head_dim a multiple of 8: 64, 128, 24, 40 — a head in 32-value
    slices and a remainder) and its generic path (20) against float64 attention."""
    check_native_decode_kernel(torch.float32, head_dim, heads, kv_heads, 8, [1, 17, 100, 3, 128, 9, 33, 64],
                               seed=6, per_seq=8, reference_dtype=torch.float64, tolerance=1e-5)

"""The native decode stack (layers/decode_stack.py, kernels/decode_stack.c) gives the bits of the
layer-by-layer path: a bf16 Llama decoding a few sequences at once, greedy, token ids and logprobs
equal with the stack and without it, at head sizes that take the attention kernel's vectorised
path and its generic one, on the panel GEMM at every row count and on the small-batch kernel for
a linear without panels (up to four rows), and steps of short prompt chunks (every token a row);
steps it cannot take (more rows than it takes) fall back."""

from __future__ import annotations

import pytest

from conftest import build_tiny_llama
from tgserve.layers import cpu_kernels
from tgserve.layers.decode_stack import DecodeStack

pytestmark = pytest.mark.skipif(not (cpu_kernels.gemm_panel_available() or cpu_kernels.linear_small_rows()),
                                reason="the decode stack needs the panel GEMM (AVX-512 BF16 or AVX2) or the small kernel")


def generate(folder: str, prompts: list[list[int]], new_tokens: int, calls: list | None = None
             ) -> list[tuple[list[int], list[float]]]:
    """Greedy outputs of an in-process bf16 engine; `calls` is emptied once it has warmed up."""
    from tgserve.config import CacheConfig, Config, ModelConfig, SchedulerConfig, ServerConfig, ShardConfig
    from tgserve.engine.core import create_engine
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    config = Config(model=ModelConfig(path=folder, dtype="bfloat16", device="cpu"),
                    server=ServerConfig(max_total_tokens=256, max_input_tokens=128),
                    scheduler=SchedulerConfig(max_batch_prefill_tokens=64), cache=CacheConfig(max_batch_total_tokens=2048),
                    shard=ShardConfig(num_shard=1))
    core, _ = create_engine(config)
    if calls is not None:
        calls.clear()  # the warm-up's own steps are not the test's
    for i, p in enumerate(prompts):
        core.scheduler.add(AddRequest(str(i), p, SamplingParams(), StoppingParams(max_new_tokens=new_tokens,
                                                                                  ignore_eos=True), 0.0))
    out = {str(i): ([], []) for i in range(len(prompts))}
    while core.scheduler.has_work():
        for o in core.step().outputs:
            assert o.error is None, o.error
            out[o.request_id][0].extend(o.token_ids)
            out[o.request_id][1].extend(o.logprobs)
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("shape", [dict(), dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=320, num_hidden_layers=3)],
                         ids=["head_dim-16", "head_dim-64"])
def test_the_stack_gives_the_layer_by_layer_bits(tmp_path, monkeypatch, shape):
    folder = build_tiny_llama(str(tmp_path / "llama"), seed=3, **shape)
    prompts = [[5, 9, 13, 2, 7], [3] * 19, [11, 4], [8, 8, 1, 6, 2, 9, 12], [4, 6], [7] * 9, [1, 2, 3]]
    calls = []
    real = cpu_kernels.decode_stack
    monkeypatch.setattr(cpu_kernels, "decode_stack", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    with_stack = generate(folder, prompts, 12, calls)
    # decode steps of up to the 7 sequences, and the prompt steps (chunks of at most 64 tokens:
    # every token a row of the decode kernel, as the layers run them)
    assert set(range(1, 8)) & set(calls) and max(calls) >= sum(map(len, prompts[:2]))
    if cpu_kernels.gemm_panel_available():
        assert max(calls) > cpu_kernels.linear_small_rows()
    monkeypatch.setattr(DecodeStack, "_usable", lambda self: False)
    without = generate(folder, prompts, 12)
    assert with_stack == without  # token ids and logprobs, bit for bit


@pytest.mark.skipif(cpu_kernels.linear_small_rows() == 0, reason="no bf16 small-batch kernel (AVX-512 BF16) here")
def test_more_rows_than_the_small_kernel_takes_fall_back_where_a_linear_has_no_panels(tmp_path, monkeypatch):
    folder = build_tiny_llama(str(tmp_path / "llama"), seed=4, intermediate_size=100)  # gate/up 200 wide: no panels
    calls = []
    real = cpu_kernels.decode_stack
    monkeypatch.setattr(cpu_kernels, "decode_stack", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    rows = cpu_kernels.linear_small_rows() + 1
    out = generate(folder, [[2 + i, 5, 7] for i in range(rows)], 4, calls)
    assert calls == [] and all(len(tokens) == 4 for tokens, _ in out)
    # up to four rows it runs, that linear on the small-batch kernel, the others on their panels
    few = [[2 + i, 5, 7, 1 + i] for i in range(rows - 1)]
    with_stack = generate(folder, few, 6, calls)
    assert calls and max(calls) == rows - 1
    monkeypatch.setattr(DecodeStack, "_usable", lambda self: False)
    assert with_stack == generate(folder, few, 6)


def test_a_bf16_server_gives_the_layer_by_layer_tokens_and_logprobs(tmp_path, server_factory, monkeypatch):
    """Through `tgserve serve --dtype bfloat16` (whose decode steps run the stack): /generate's
    greedy tokens and logprobs equal the in-process engine's with the stack switched off."""
    import json
    import urllib.request

    folder = build_tiny_llama(str(tmp_path / "llama"), seed=6)
    server = server_factory(folder, "--dtype", "bfloat16", "--max-total-tokens", "512",
                            "--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens", "128")
    served = []
    for text in ("The quick brown fox", "Hello there, how are", "a"):
        body = json.dumps({"inputs": text, "parameters": {"max_new_tokens": 10, "details": True, "ignore_eos_token": True,
                                                         "decoder_input_details": True}}).encode()
        request = urllib.request.Request(server.url + "/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            details = json.load(r)["details"]
        served.append(([t["id"] for t in details["prefill"]], [t["id"] for t in details["tokens"]],
                       [t["logprob"] for t in details["tokens"]]))
    monkeypatch.setattr(DecodeStack, "_usable", lambda self: False)
    for prompt, tokens, logprobs in served:
        [(expected_tokens, expected_logprobs)] = generate(folder, [prompt], 10)
        assert (tokens, logprobs) == (expected_tokens, expected_logprobs)

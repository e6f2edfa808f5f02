"""GPTQ and AWQ int4 checkpoints (quant/prequantized.py) serve on their own grid.

Each checkpoint is made here from a tiny random Llama: its linears quantized round-to-nearest and
packed by quant/reference.py's own packers, written from the formats' descriptions (GPTQ: 8 values per
int32 along the inputs, v1 zero points stored minus one; AWQ: along the outputs in the order
0 2 4 6 1 3 5 7), beside a float checkpoint of the weights they dequantize to. Proven: every
layer's int4 values are the checkpoint's and it dequantizes to the checkpoint's weight up to the
bf16 rounding of scale and zero; the served greedy tokens are transformers' on the float
checkpoint (its linears rounding activations and outputs to bf16, as the int4 kernel does: the
approach of test_quant_model.py); the format is found from config.json; what cannot be served is
a start-up error naming why; two tensor-parallel ranks load what one does."""

from __future__ import annotations

import functools
import json
import os
import shutil
import traceback

import pytest
import torch
from torch import nn

from tgserve import distributed
from tgserve.layers.linear import ColumnParallelLinear, LinearBase, MergedColumnParallelLinear, RowParallelLinear
from tgserve.quant import quant_method
from tgserve.quant.int4 import dequantize_int4, quantize_int4, unpack
from tgserve.quant.prequantized import Format, PrequantizedInt4
from tgserve.weights.loader import load_model

from conftest import free_port, run_ranks
from models.families import build, prompts
from quant.reference import dequantized_gptq_awq, gptq_awq_tensors, ranks, reference_matmul
from quant.test_quant_model import greedy

CPU = torch.device("cpu")
MAX_LEN, NEW_TOKENS, TIE = 128, 10, 0.01  # TIE: logprob gap of a near-tie (float32, as test_quant_model)
LENGTHS = [1, 9, 33, 17]
TINY = dict(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {
    "gptq-v1-asym-g32": dict(method="gptq", group=32, sym=False, checkpoint_format="gptq"),
    "gptq-v2-sym-g64": dict(method="gptq", group=64, sym=True, checkpoint_format="gptq_v2"),
    "gptq-v1-sym-g128": dict(method="gptq", group=128, sym=True, checkpoint_format="gptq"),
    "gptq-v2-asym-per-row": dict(method="gptq", group=-1, sym=False, checkpoint_format="gptq_v2"),
    "gptq-act-order-g32": dict(method="gptq", group=32, sym=False, checkpoint_format="gptq", desc_act=True),
    "awq-g64": dict(method="awq", group=64, sym=False),
}
EXACT = [v for v, spec in VARIANTS.items() if not spec.get("desc_act")]


# ---- the checkpoints ------------------------------------------------------------------------------------


def write_checkpoints(base: str, root: str, name: str, spec: dict):
    """`root/name` (quantized) and `root/name-float` (its dequantized weights); the references."""
    from safetensors.torch import load_file, save_file

    folder, float_dir = os.path.join(root, name), os.path.join(root, name + "-float")
    for d in (folder, float_dir):
        shutil.copytree(base, d)
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(d, f))
    tensors, floats, reference = {}, {}, {}
    for i, (key, t) in enumerate(sorted(load_file(os.path.join(base, "model.safetensors")).items())):
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in LINEARS:
            tensors[key] = floats[key] = t.half()  # fp16, as such checkpoints ship, on both sides
            continue
        parts, reference[module], floats[key] = gptq_awq_tensors(t.float(), spec, seed=i)
        tensors.update({f"{module}.{p}": v for p, v in parts.items()})
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    save_file(floats, os.path.join(float_dir, "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": spec["method"], "bits": 4, "group_size": spec["group"]}
    if spec["method"] == "awq":
        qc.update(version="gemm", zero_point=True)
    else:
        qc.update(desc_act=bool(spec.get("desc_act")), sym=spec["sym"], checkpoint_format=spec["checkpoint_format"])
    edit_config(folder, quantization_config=qc)
    return folder, float_dir, reference


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, str, dict]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("prequantized")
    base = build(str(root / "base"), LlamaConfig(**TINY), LlamaForCausalLM)
    return {name: write_checkpoints(base, str(root), name, spec) for name, spec in VARIANTS.items()}


# ---- 1. every layer is the checkpoint's grid ----------------------------------------------------------


def fused_reference(reference: dict, prefix: str, names: tuple[str, ...]):
    """(q, scale per input, zero point per input, dequantized) [out, in] of checkpoint linears stacked."""
    rows = [reference[f"{prefix}.{n}"] for n in names]
    q = torch.cat([r[0] for r in rows])
    s = torch.cat([r[1][r[3]].t().float() for r in rows])
    z = torch.cat([r[2][r[3]].t() for r in rows])
    return q, s, z, torch.cat([dequantized_gptq_awq(*r) for r in rows])


def assert_layer_is_grid(layer: LinearBase, q, s, z, w, what: str) -> None:
    """The layer's int4 values are q; its bf16 scale and zero are the checkpoint's s and
    (8 - z) * s rounded once; its weight is w up to that rounding."""
    assert isinstance(layer.quant, PrequantizedInt4) and layer.weight is None, what
    out, inn = q.shape
    assert torch.equal(unpack(layer.qweight, out, inn).long(), q), f"{what}: int4 values are not the checkpoint's"
    group = layer.quant.group
    scale, zero = layer.scales_zeros.float().transpose(0, 1).unbind(-1)  # [out, in/group]
    assert torch.equal(scale, s[:, ::group].bfloat16().float()), f"{what}: scales"
    assert torch.equal(zero, ((8 - z[:, ::group]) * s[:, ::group]).bfloat16().float()), f"{what}: zeros"
    err = (layer.quant.dequantize(layer) - w).abs()
    # bf16 keeps 8 significant bits: scale and zero each within 2^-8 of theirs, |q - 8|, |8 - z| <= 8
    assert (err <= s / 16).all(), f"{what}: dequantized weight off by {(err / s).max():.3g} of a step"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("variant", EXACT)
def test_every_linear_keeps_the_checkpoints_grid(checkpoints, variant, dtype):
    """Whatever the model's dtype: the grid is never cast to it."""
    folder, _, reference = checkpoints[variant]
    model, _ = load_model(folder, dtype, CPU, MAX_LEN)  # no --quantize: found in config.json
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        for layer, names in ((block.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             (block.self_attn.o_proj, ("self_attn.o_proj",)),
                             (block.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                             (block.mlp.down_proj, ("mlp.down_proj",))):
            assert_layer_is_grid(layer, *fused_reference(reference, prefix, names), f"{variant} {prefix} {names}")


def test_act_order_linears_are_requantized_from_the_checkpoints_weight(checkpoints, caplog, monkeypatch):
    """desc_act with shuffled g_idx: int4's own groups of 32 over the checkpoint's dequantized weight."""
    from tgserve.quant import weight_only

    monkeypatch.setattr(weight_only, "_warned", set())  # warnings are once per process
    folder, _, reference = checkpoints["gptq-act-order-g32"]
    model, _ = load_model(folder, torch.float32, CPU, MAX_LEN)
    assert "act-order" in caplog.text
    layer = model.model.layers[0].mlp.down_proj
    *_, w = fused_reference(reference, "model.layers.0", ("mlp.down_proj",))
    assert layer.quant.group == 32
    assert torch.equal(layer.quant.dequantize(layer), dequantize_int4(*quantize_int4(w, 32), 32))
    assert ((layer.quant.dequantize(layer) - w).norm() / w.norm()).item() < 0.12


def one_linear(variant: str, out: int, inn: int, seed: int = 0):
    """A lone linear's checkpoint tensors, as the loader gathers them: (Int4Grid, (q, s, z, w))."""
    spec = VARIANTS[variant]
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)) * 0.05
    parts, (q, s, z, g_idx), deq = gptq_awq_tensors(w, spec, seed)
    fmt = Format(spec["method"], spec["group"], spec.get("checkpoint_format") == "gptq")
    names = {f"x.{p}" for p in parts}
    [(name, grid)] = list(fmt.as_grids(((f"x.{p}", t) for p, t in parts.items()), names))
    assert name == "x.weight"
    return grid, (q, s[g_idx].t().float(), z[g_idx].t(), deq)


def loaded(layer: LinearBase, grid) -> LinearBase:
    layer.weight.weight_loader(layer.weight, grid, None)
    layer.quant.after_load(layer)
    return layer


@pytest.mark.parametrize("variant", ["gptq-v1-asym-g32", "gptq-v1-sym-g128", "awq-g64"])
def test_column_and_row_parallel_shards_are_the_checkpoints_slices(variant, monkeypatch):
    """Column shards take rows, row shards columns — a split inside a group of 128 keeps its scale —
    and each shard is the checkpoint's grid; the row shards' outputs sum to the whole layer's, whose
    output is the dequantized matmul for decode and prefill sizes."""
    grid, (q, s, z, w) = one_linear(variant, 256, 256)
    whole = loaded(ColumnParallelLinear(256, 256, quant=quant_method("gptq")), grid)
    assert_layer_is_grid(whole, q, s, z, w, f"{variant} one rank")
    cols = ranks(monkeypatch, lambda: loaded(ColumnParallelLinear(256, 256, quant=quant_method("gptq")), grid))
    rows = ranks(monkeypatch, lambda: loaded(RowParallelLinear(256, 256, quant=quant_method("gptq")), grid))
    for r, (c, part) in enumerate(zip(cols, rows)):
        sl = slice(128 * r, 128 * (r + 1))
        assert_layer_is_grid(c, q[sl], s[sl], z[sl], w[sl], f"{variant} column rank {r}")
        assert_layer_is_grid(part, q[:, sl], s[:, sl], z[:, sl], w[:, sl], f"{variant} row rank {r}")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        summed = sum(p.quant.apply(p, h, None) for p, h in zip(rows, x.chunk(2, dim=1)))
    expected = reference_matmul("int4", x, whole.quant.dequantize(whole))
    assert (summed - expected).abs().max() <= 2e-2 * expected.abs().max()
    prefill = torch.randn(300, 256, generator=torch.Generator().manual_seed(2))  # past dequantize-then-GEMM's switch
    with torch.inference_mode():
        y = whole.quant.apply(whole, prefill, None)
    expected = reference_matmul("int4", prefill, whole.quant.dequantize(whole))
    assert (y - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_float_parts_and_shapes_off_the_kernel_take_int4s_float_path(caplog, monkeypatch):
    """A part the checkpoint keeps in float (modules_to_not_convert) quantizes its whole fused layer
    from floats; a layer of 24 outputs (the kernel wants multiples of 16) falls back to int8."""
    from tgserve.quant import weight_only

    monkeypatch.setattr(weight_only, "_warned", set())  # warnings are once per process
    grid, _ = one_linear("awq-g64", 64, 128)
    up = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    merged = MergedColumnParallelLinear(128, [64, 64], quant=quant_method("awq"))
    merged.weight.weight_loader(merged.weight, up, 1)
    merged.weight.weight_loader(merged.weight, grid, 0)
    merged.quant.after_load(merged)
    expected = dequantize_int4(*quantize_int4(torch.cat([grid.dequantize(), up]), 32), 32)
    assert torch.equal(merged.quant.dequantize(merged), expected)

    grid, (*_, w) = one_linear("gptq-v1-asym-g32", 24, 64)
    odd = loaded(ColumnParallelLinear(64, 24, quant=quant_method("gptq")), grid)
    assert odd.qweight.dtype == torch.int8 and "quantized to int8" in caplog.text
    assert ((odd.quant.dequantize(odd) - w).norm() / w.norm()).item() < 0.01


def test_a_row_split_off_the_kernels_groups_is_an_error(monkeypatch):
    grid, _ = one_linear("gptq-v1-asym-g32", 64, 192)  # 4 ranks: 48 input features each
    with pytest.raises(ValueError, match="multiples of 32"):
        ranks(monkeypatch, lambda: loaded(RowParallelLinear(192, 64, quant=quant_method("gptq")), grid), tp=4)


# ---- 2. the served model is transformers' on the dequantized checkpoint -------------------------------


def _rounded_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = reference_matmul("int4", x, linear.weight)
    return y if linear.bias is None else y + linear.bias


def transformers_as_int4(float_dir: str):
    """transformers' model of the float checkpoint, its decoder linears rounding activations and
    outputs to bf16 as the int4 kernel does."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for module in hf.model.layers.modules():
        if isinstance(module, nn.Linear):
            module.forward = functools.partial(_rounded_linear, module)
    return hf


def transformers_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [torch.log_softmax(t[0].float(), -1) for t in out.logits]


@pytest.mark.parametrize("variant", ["gptq-v1-asym-g32", "gptq-v2-sym-g64", "awq-g64"])
def test_greedy_tokens_are_transformers_on_the_dequantized_checkpoint(checkpoints, variant):
    """All prompts at once through the engine (chunked prefill beside decodes), token for token;
    where a token differs it must be a near-tie of transformers' (the kernel sums in another order,
    scale and zero are bf16), and the engine resumes on transformers' prefix."""
    folder, float_dir, _ = checkpoints[variant]
    model, _ = load_model(folder, torch.float32, CPU, MAX_LEN)
    hf = transformers_as_int4(float_dir)
    batch = prompts(TINY["vocab_size"], LENGTHS)
    got_all, _ = greedy(model, batch, torch.float32, [NEW_TOKENS] * len(batch))
    ties = []
    for i, (prompt, got) in enumerate(zip(batch, got_all)):
        expected, logprobs = transformers_greedy(hf, prompt, NEW_TOKENS)
        start = 0
        while (j := next((j for j, (a, b) in enumerate(zip(got, expected[start:])) if a != b), None)) is not None:
            k = start + j
            gap = (logprobs[k].max() - logprobs[k][got[j]]).item()
            assert gap < TIE, (f"{variant}: prompt {i} token {k}: {got[j]} where transformers takes {expected[k]} "
                               f"(logprob {gap:.4f} below it); transformers {expected}")
            ties.append(gap)
            start = k + 1
            if start == NEW_TOKENS:
                break
            got = greedy(model, [prompt + expected[:start]], torch.float32, [NEW_TOKENS - start])[0][0]
    assert len(ties) <= len(batch), f"{variant}: {len(ties)} near-ties taken the other way ({ties})"


# ---- 3. found from config.json; --quantize; what cannot be served ------------------------------------


def test_quantize_flag_names_the_format_or_is_left_out(checkpoints):
    from tgserve.cli import build_parser, config_from_args

    for variant, flag in (("gptq-v1-asym-g32", "gptq"), ("awq-g64", "awq")):
        folder, _, _ = checkpoints[variant]
        auto, _ = load_model(folder, torch.float32, CPU, MAX_LEN)
        named, _ = load_model(folder, torch.float32, CPU, MAX_LEN, quantize=flag)
        a, b = auto.model.layers[1].mlp.down_proj, named.model.layers[1].mlp.down_proj
        assert torch.equal(a.quant.dequantize(a), b.quant.dequantize(b))
        args = build_parser({}).parse_args(["serve", "--model-id", folder, "--quantize", flag])
        assert config_from_args(args).model.quantize == flag


def config_only(folder: str, tmp_path, **changes) -> str:
    """A folder with `folder`'s config.json, its quantization_config updated: the checks come
    before any tensor is read."""
    target = tmp_path / "edited"
    target.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), target)
    with open(target / "config.json") as f:
        config = json.load(f)
    if config.get("quantization_config") is not None:
        config["quantization_config"].update(changes)
    with open(target / "config.json", "w") as f:
        json.dump(config, f)
    return str(target)


@pytest.mark.parametrize("variant, changes, quantize, message", [
    ("gptq-v1-asym-g32", {"bits": 8}, None, "8-bit weights"),
    ("gptq-v1-asym-g32", {"group_size": 48}, None, "groups of 48 input features"),
    ("gptq-v1-asym-g32", {}, "int8", "GPTQ-quantized.*--quantize int8 cannot quantize it again"),
    ("gptq-v1-asym-g32", {}, "awq", "--quantize awq: the checkpoint is not AWQ-quantized .*'gptq'"),
    ("gptq-v1-asym-g32", {"checkpoint_format": "marlin"}, None, "'marlin' format"),
    ("gptq-v1-asym-g32", {"lm_head": True}, None, "quantized LM head"),
    ("awq-g64", {"version": "gemv"}, None, "version 'gemv'"),
    ("awq-g64", {}, "int4", "AWQ-quantized.*--quantize int4 cannot"),
    ("gptq-v1-asym-g32-float", {}, "gptq", "no quantization_config.*--quantize int4"),
], ids=["bits-8", "group-48", "int8-on-gptq", "awq-on-gptq", "marlin", "lm-head", "awq-gemv", "int4-on-awq",
        "gptq-on-float"])
def test_what_cannot_be_served_is_a_named_startup_error(checkpoints, tmp_path, variant, changes, quantize, message):
    name = variant.removesuffix("-float")
    folder = checkpoints[name][1 if variant.endswith("-float") else 0]
    with pytest.raises(ValueError, match=message):
        load_model(config_only(folder, tmp_path, **changes), torch.float32, CPU, MAX_LEN, quantize=quantize)


def test_a_missing_part_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _, _ = checkpoints["awq-g64"]
    target = tmp_path / "no-zeros"
    shutil.copytree(folder, target)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj has no \['qzeros'\]"):
        load_model(str(target), torch.float32, CPU, MAX_LEN)


def test_a_layout_transform_of_a_quantized_weight_is_refused_by_name():
    """GPT-2's transposed Conv1D or NeoX's interleaved q/k/v would reshape the weight: not silently."""
    grid, _ = one_linear("gptq-v1-asym-g32", 64, 64)
    with pytest.raises(AttributeError, match="cannot be changed with `t`"):
        grid.t()


# ---- 4. two tensor-parallel ranks load what one does ---------------------------------------------------


def _tp_worker(rank: int, port: int, folder: str, batch: list[list[int]], out: str) -> None:
    from tgserve.config import CacheConfig, Config, ModelConfig, SchedulerConfig, ServerConfig, ShardConfig
    from tgserve.engine.core import create_engine, create_follower, follow
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    try:
        distributed.init(rank, 2, "gloo", f"tcp://127.0.0.1:{port}")
        config = Config(model=ModelConfig(model_id=folder, path=folder, dtype="float32", device="cpu"),
                        cache=CacheConfig(max_batch_total_tokens=1024),
                        scheduler=SchedulerConfig(max_batch_prefill_tokens=32),
                        server=ServerConfig(max_input_tokens=MAX_LEN - 1, max_total_tokens=MAX_LEN),
                        shard=ShardConfig(num_shard=2, master_port=port))
        tokens: dict[str, list[int]] = {}
        if rank:
            runner = create_follower(config, rank)
            follow(runner)
        else:
            core, _ = create_engine(config)
            runner = core.runner
            for i, p in enumerate(batch):
                core.scheduler.add(AddRequest(str(i), p, SamplingParams(),
                                              StoppingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), 0.0))
            while core.scheduler.has_work():
                for o in core.step().outputs:
                    assert o.error is None, o.error
                    tokens.setdefault(o.request_id, []).extend(o.token_ids)
            distributed.broadcast_object(None)  # rank 1 leaves follow()
        weights = {name: m.quant.dequantize(m) for name, m in runner.model.named_modules() if isinstance(m, LinearBase)}
        torch.save({"tokens": [tokens.get(str(i)) for i in range(len(batch))], "weights": weights}, f"{out}.{rank}")
        distributed.shutdown()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


@pytest.mark.slow
def test_two_ranks_load_a_gptq_checkpoint_as_one(checkpoints, tmp_path):
    """Groups of 128 over two ranks: o_proj's split (64 features each) falls inside them. Each rank's
    layers are the one-rank layers' slices, exactly; the greedy tokens are one rank's, but for a
    near-tie (the ranks' partial sums are rounded to bf16 before the all-reduce)."""
    folder, _, _ = checkpoints["gptq-v1-sym-g128"]
    batch = prompts(TINY["vocab_size"], LENGTHS)
    out = str(tmp_path / "rank")
    run_ranks(_tp_worker, (free_port(), folder, batch, out), timeout=300)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    one, _ = load_model(folder, torch.float32, CPU, MAX_LEN)
    head = 32  # head_dim: 4 query heads, 2 KV heads, each rank holds half of each
    for name, m in one.named_modules():
        if not isinstance(m, LinearBase):
            continue
        w = m.quant.dequantize(m)
        if name.endswith("qkv_proj"):
            q, k, v = w.split([4 * head, 2 * head, 2 * head])
            parts = [torch.cat([t.chunk(2)[r] for t in (q, k, v)]) for r in range(2)]
        elif name.endswith("gate_up_proj"):
            gate, up = w.chunk(2)
            parts = [torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]) for r in range(2)]
        else:  # o_proj, down_proj: row-parallel
            parts = list(w.chunk(2, dim=1))
        for r in range(2):
            assert torch.equal(ranks[r]["weights"][name], parts[r]), f"{name} on rank {r}"
    expected, best = greedy(one, batch, torch.float32, [NEW_TOKENS] * len(batch))
    for i, (got, want, tops) in enumerate(zip(ranks[0]["tokens"], expected, best)):
        j = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if j is not None:  # from here on the two runs continue different texts
            ids, logprobs = tops[j]
            near = dict(zip(ids, logprobs))
            assert got[j] in near and max(logprobs) - near[got[j]] < TIE, f"prompt {i}: 2 ranks {got} != 1 rank {want}"

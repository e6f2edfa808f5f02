"""The GPU check: one command, a few minutes, on a machine with an NVIDIA GPU.

    python -m bench.gpu_check                 # the GPU (cuda:0)
    python -m bench.gpu_check --device cpu --shape tiny   # the same plumbing on the CPU, in seconds

1. Correctness: a small random Llama (float32) built here, greedy through tgserve's engine on the
   device (several prompts at once, chunked prefill mixed with decodes) against transformers'
   `generate` on the same device and weights, token for token.
   Twice: decode steps replayed as CUDA graphs (--cuda-graphs, padded to their batch buckets), and
   every step eager.
2. Speed: a random 7B-class Llama (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000;
   ~13.5 GB in bf16) made directly on the device (nothing downloaded or read from disk): one
   stream's median decode step against the bandwidth roofline (weight bytes / the device's
   measured copy bandwidth), and 64 streams' decode tok/s; with CUDA graphs and eager, same run;
   with graphs also one replay of the one-row graph alone (the device's share of a step: the rest
   is host work, what overlapping host and device work could hide).

Prints a table and writes the figures as JSON (--output). No figure here is a pass/fail line;
the equality check is (exit 1 when tokens differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tgserve.config import ModelConfig, cuda_graph_sizes

CUDA_GRAPHS = ModelConfig.__dataclass_fields__["cuda_graphs"].default

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1000),
}
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=704, vocab_size=2000)
BLOCK = 16


def llama_config(shape: dict, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=max_positions, tie_word_embeddings=False,
                       eos_token_id=0, bos_token_id=1, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"])


def engine(model, dtype: torch.dtype, device: torch.device, tokens: int, max_len: int, graph_sizes: tuple[int, ...]):
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.runner import ModelRunner
    from tgserve.engine.scheduler import Scheduler

    blocks = tokens // BLOCK + 8
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=512), KVCacheManager(blocks, BLOCK), max_len)
    return EngineCore(scheduler, ModelRunner(model, blocks, BLOCK, dtype, device, graph_sizes=graph_sizes))


def run(core, prompts: list[list[int]], new_tokens: int, sync) -> tuple[list[list[int]], list[float]]:
    """Every prompt at once, greedy, EOS ignored: tokens per prompt, and the seconds of each step
    in which every sequence was decoding."""
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    for i, p in enumerate(prompts):
        core.scheduler.add(AddRequest(str(i), p, SamplingParams(),
                                      StoppingParams(max_new_tokens=new_tokens, ignore_eos=True), 0.0))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    decode_steps = []
    while core.scheduler.has_work():
        all_decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in core.scheduler.running) \
            and not core.scheduler.waiting and len(core.scheduler.running) == len(prompts)
        start = time.perf_counter()
        outputs = core.step().outputs
        sync()
        if all_decoding:
            decode_steps.append(time.perf_counter() - start)
        for o in outputs:
            assert o.error is None, o.error
            tokens[o.request_id].extend(o.token_ids)
    return [tokens[str(i)] for i in range(len(prompts))], decode_steps


def check_equality(device: torch.device, sync, graph_sizes: tuple[int, ...]) -> dict:
    """A small random float32 Llama: tgserve's greedy tokens against transformers' on the device,
    with CUDA graphs (graph_sizes) and eager."""
    import tempfile

    from transformers import LlamaForCausalLM

    from tgserve.weights.loader import load_model

    torch.manual_seed(0)
    reference = LlamaForCausalLM(llama_config(SMALL, 512)).eval()
    folder = tempfile.mkdtemp(prefix="tgserve-gpu-check-")
    reference.save_pretrained(folder, safe_serialization=True)
    reference = reference.to(device)
    model, _ = load_model(folder, torch.float32, device, 512)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, SMALL["vocab_size"], (n,), generator=generator).tolist() for n in (5, 23, 1, 64, 17, 40)]
    new_tokens = 24
    got = {mode: run(engine(model, torch.float32, device, len(prompts) * 128, 512, sizes), prompts, new_tokens, sync)[0]
           for mode, sizes in (("eager", ()), ("graphs", graph_sizes))}
    expected = []
    with torch.inference_mode():
        for p in prompts:  # one at a time: no padding in the reference
            ids = torch.tensor([p], device=device)
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    return {"sequences": len(prompts), "new_tokens": new_tokens,
            **{f"equal_{mode}": sum(g == e for g, e in zip(tokens, expected)) for mode, tokens in got.items()}}


def copy_bandwidth(device: torch.device, sync, gib: float) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline's bandwidth."""
    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - start)
    del a, b
    return 2 * n * 4 / best


def replay_seconds(graphs, batch: int, sync, times: int = 20) -> float:
    """Median seconds of one replay of the graph captured for `batch` rows (the widest one captured):
    the device's share of a decode step (run eagerly on the CPU, the forward pass itself)."""
    key = max((k for k in graphs.graphs if k[0] == batch), key=lambda k: k[1], default=None)
    if key is None:
        return float("nan")
    graph, seconds = graphs.graphs[key], []
    with torch.inference_mode():
        for _ in range(times):
            start = time.perf_counter()
            graphs.launch(graph)
            sync()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def speed(device: torch.device, sync, shape: str, dtype: torch.dtype, streams: int, new_tokens: int,
          graph_sizes: tuple[int, ...], report) -> dict:
    """The model's figures, then each mode's (eager first: a capture that breaks the device cannot
    take the eager figures with it); `report(figures)` after each, so a crash keeps what was measured."""
    from tgserve.models.registry import build_model

    max_len = 1024
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(llama_config(SHAPES[shape], max_len), dtype, max_len)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if quant is not None:
            quant.after_load(module)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, sync, 1.0 if shape == "7b" else 0.05)
    vocab = SHAPES[shape]["vocab_size"]
    prompt = [[2 + (7 * i + j) % (vocab - 2) for j in range(32)] for i in range(streams)]
    roofline_ms = 1000 * weight_bytes / bandwidth
    figures = {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "weight_gb": weight_bytes / 1e9,
               "copy_bandwidth_gb_s": bandwidth / 1e9, "roofline_ms": roofline_ms, "streams": streams}
    for mode, sizes in (("eager", ()), ("graphs", graph_sizes)):
        core = engine(model, dtype, device, streams * (32 + new_tokens) + 64, max_len, sizes)
        run(core, prompt[:1], 4, sync)  # warm-up (and the graphs' captures)
        run(core, prompt, 3, sync)
        _, one = run(core, prompt[:1], new_tokens, sync)
        _, many = run(core, prompt, new_tokens, sync)
        one_ms = 1000 * statistics.median(one)
        figures[mode] = {"one_stream_ms": one_ms, "roofline_share": roofline_ms / one_ms,
                         "many_streams_tok_s": streams / statistics.median(many)}
        graphs = core.runner.graphs
        if graphs is not None:  # a one-row step's device work alone: the rest of a step is the host's
            figures[mode]["one_stream_replay_ms"] = 1000 * replay_seconds(graphs, 1, sync)
            figures[mode]["graph_shapes"] = sorted(graphs.graphs)  # (batch, block-table width)
            figures[mode]["graphs_off_because"] = graphs.disabled
        del core
        report(figures, mode)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cuda-graphs", default=CUDA_GRAPHS, help="batch sizes captured as CUDA graphs (as serve's flag)")
    p.add_argument("--output", default="gpu-check.json")
    args = p.parse_args()
    graph_sizes = cuda_graph_sizes(args.cuda_graphs)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: this check needs an NVIDIA GPU (or --device cpu --shape tiny)")
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"tgserve GPU check on {name}", flush=True)
    start = time.perf_counter()
    result = {"device": name}

    def dump() -> None:
        with open(args.output, "w") as f:
            json.dump({**result, "seconds": time.perf_counter() - start}, f, indent=2)

    equality = result["equality"] = check_equality(device, sync, graph_sizes)
    dump()
    print(f"greedy float32 vs transformers: {equality['equal_graphs']}/{equality['sequences']} sequences equal "
          f"with CUDA graphs, {equality['equal_eager']}/{equality['sequences']} eager "
          f"({equality['new_tokens']} tokens each)", flush=True)
    print(f"\n| device | shape | weights | copy bandwidth | steps | 1 stream | roofline | share "
          f"| {args.streams} streams |\n|---|---|---|---|---|---|---|---|---|", flush=True)

    def report(figures: dict, mode: str) -> None:  # each mode's line as soon as it is measured
        result.update(figures)
        dump()
        f = figures[mode]
        replay = f" (replay {f['one_stream_replay_ms']:.2f})" if "one_stream_replay_ms" in f else ""
        print(f"| {name} | {figures['shape']} {figures['dtype']} | {figures['weight_gb']:.1f} GB | "
              f"{figures['copy_bandwidth_gb_s']:.0f} GB/s | {mode} | {f['one_stream_ms']:.2f} ms/token{replay} | "
              f"{figures['roofline_ms']:.2f} ms | {100 * f['roofline_share']:.0f}% | "
              f"{f['many_streams_tok_s']:.0f} tok/s |", flush=True)
        if f.get("graphs_off_because"):
            print(f"  CUDA graphs were turned off: {f['graphs_off_because']}", flush=True)

    speed(device, sync, args.shape, getattr(torch, args.dtype), args.streams, args.new_tokens, graph_sizes, report)
    dump()
    print(f"\nfigures: {args.output} ({time.perf_counter() - start:.0f} s)")
    return 0 if equality["equal_graphs"] == equality["equal_eager"] == equality["sequences"] else 1

if __name__ == "__main__":
    raise SystemExit(main())

"""The judge for every architecture: a tiny random model built with transformers, saved as
safetensors, run by our engine (in-process, and through `tgserve serve`) and compared token for
token with transformers' greedy `generate` in float32, alone and in a batch of mixed prompt lengths
with chunked prefill. Used by the tests/models/test_*.py files."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

from tgserve.weights.loader import load_model

CPU = torch.device("cpu")
MAX_LEN = 256
LENGTHS = [1, 9, 33, 70, 17]  # prompts of mixed lengths (33 and 70 span several prefill chunks)
ATTENTION_WEIGHTS = ("q_proj.", "k_proj.", "qkv_proj.", "query_key_value.", "c_attn.", "Wqkv.", ".q.", ".k.")


def build(folder: str, config, model_cls, seed: int = 0, tokenizer: bool = True) -> str:
    """Save a random `model_cls(config)` into `folder` (with the tiny tokenizer when `tokenizer`),
    its weights "sharpened": transformers initialises q/k so small that attention is almost
    uniform and norms to exactly 1, and a bug in positions, masks or norm loading would barely
    move the logits."""
    from safetensors.torch import load_file, save_file

    from conftest import build_tiny_tokenizer

    os.makedirs(folder, exist_ok=True)
    if tokenizer:
        build_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        tensors = load_file(path)
        for key, t in tensors.items():
            if not t.is_floating_point():
                continue
            if key.endswith(".bias") or "norm" in key or "ln_" in key or "layernorm" in key:
                t = t + 0.1 * torch.randn(t.shape, generator=g)
            if any(a in key for a in ATTENTION_WEIGHTS) and t.dim() == 2:
                t = t * 6
            tensors[key] = t.contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


def family_fixture(families: dict):
    """A module-scoped fixture over `families` (name → builder): (name, folder built once per module)."""

    @pytest.fixture(scope="module", params=list(families))
    def family(request, tmp_path_factory):
        return request.param, families[request.param](str(tmp_path_factory.mktemp(request.param)))

    return family


def prompts(vocab_size: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def transformers_greedy(folder: str, batch: list[list[int]], n: int) -> list[list[int]]:
    """Each prompt's greedy continuation (an encoder-decoder's: the decoder's tokens after its start)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
    hf = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
    out = []
    for p in batch:
        with torch.inference_mode():
            ids = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(ids[0, 1:].tolist() if seq2seq else ids[0, len(p):].tolist())
    return out


def engine_greedy(folder: str, batch: list[list[int]], n: int, budget: int, together: bool,
                  block_size: int = 16, num_blocks: int = 96, max_len: int = MAX_LEN,
                  prefix_caching: bool = False, stats: dict | None = None) -> list[list[int]]:
    """The engine's greedy tokens for each prompt: all added at once (`together`) or each run to
    its end before the next; `stats` gets the prefix cache's hit tokens."""
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.runner import ModelRunner
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    model, _ = load_model(folder, torch.float32, CPU, max_len)
    decoder_start = model.decoder_start_token_id if getattr(model, "is_encoder_decoder", False) else None
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget),
                          KVCacheManager(num_blocks, block_size, prefix_caching), max_len, decoder_start)
    engine = EngineCore(scheduler, ModelRunner(model, num_blocks, block_size, torch.float32, CPU))
    tokens: dict[str, list[int]] = {}

    def drain():
        while scheduler.has_work():
            for o in engine.step().outputs:
                assert o.error is None, o.error
                tokens.setdefault(o.request_id, []).extend(o.token_ids)

    for i, p in enumerate(batch):
        scheduler.add(AddRequest(str(i), p, SamplingParams(), StoppingParams(max_new_tokens=n, ignore_eos=True), 0.0))
        if not together:
            drain()
    drain()
    assert scheduler.kv.num_free_blocks == scheduler.kv.pool.num_usable, "KV blocks leaked"
    if stats is not None:
        stats["prefix_hit_tokens"] = scheduler.kv.prefix_hit_tokens
    return [tokens[str(i)] for i in range(len(batch))]


def check_greedy(folder: str, n: int = 12, lengths=LENGTHS, max_len: int = MAX_LEN) -> None:
    """Alone, then all together in 32-token steps (chunked prefill mixed with decodes)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    batch = prompts(vocab, lengths)
    expected = transformers_greedy(folder, batch, n)
    for together, budget in ((False, 256), (True, 32)):
        got = engine_greedy(folder, batch, n, budget, together, max_len=max_len)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"prompt {i} (length {len(batch[i])}, together={together}): tgserve {g} != transformers {e}"


def served_greedy(server, texts: list[str], n: int) -> list[list[int]]:
    """Through `tgserve serve`: the texts as concurrent /generate requests, each's greedy tokens."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(text: str) -> list[int]:
        r = httpx.post(server.url + "/generate", timeout=300, json={"inputs": text, "parameters": {
            "max_new_tokens": n, "details": True, "ignore_eos_token": True}})
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(ask, texts))


def check_served(server, folder: str, n: int = 8) -> None:
    """Through `tgserve serve`: a concurrent burst of prompts of mixed lengths, each equal to
    transformers' greedy continuation of the same token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "Paged attention keeps the cache",
             "Numbers 0123456789 and punctuation: ,.;:!?()[]{} Continuous batching serves many users at once."]
    assert served_greedy(server, texts, n) == transformers_greedy(folder, [tok(t).input_ids for t in texts], n)


def serve_and_check(server_factory, folder: str, *args: str) -> None:
    """Start `tgserve serve` on the folder (the tiny server's limits), check_served, stop it."""
    from conftest import TINY_SERVER_ARGS

    server = server_factory(folder, *TINY_SERVER_ARGS, *args)
    try:
        check_served(server, folder)
    finally:
        server.stop()

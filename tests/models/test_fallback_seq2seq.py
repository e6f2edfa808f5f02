"""The transformers fallback for encoder-decoder models (BART, Marian, UMT5 have no native
implementation): each request's encoder runs once, when it is admitted; the batch holds the encoder
outputs and cross-attention cache beside the decoder's, each left-padded with its own mask, and
greedy tokens equal transformers' own generate for each request alone — run alone, batched with
mixed prompt lengths, and joining and leaving a running batch."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import TINY_SERVER_ARGS
from models.families import build, CPU, family_fixture, prompts, transformers_greedy

# learned positions (BART), sinusoidal positions and decoder start = pad (Marian), relative bias (UMT5)
SIZES = dict(vocab_size=400, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
             forced_eos_token_id=None, tie_word_embeddings=False)


def bart(folder):
    from transformers import BartConfig, BartForConditionalGeneration

    # larger weights: outputs that vary (and that a wrong decoder position changes)
    return build(folder, BartConfig(**SIZES, init_std=1.0), BartForConditionalGeneration)


def marian(folder):
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(**SIZES, init_std=1.0, pad_token_id=1, eos_token_id=0, decoder_start_token_id=1)
    return build(folder, config, MarianMTModel, tokenizer=False)


def umt5(folder):
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    config = UMT5Config(vocab_size=400, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        eos_token_id=0, pad_token_id=0, decoder_start_token_id=0, initializer_factor=10.0)
    return build(folder, config, UMT5ForConditionalGeneration, tokenizer=False)


FAMILIES = {"bart": bart, "marian": marian, "umt5": umt5}


family = family_fixture(FAMILIES)


def fallback_greedy(folder: str, batch: list[list[int]], lengths: list[int], budget: int,
                    steps_between: int | None) -> list[list[int]]:
    """Our engine on the fallback runner, request i asking for lengths[i] tokens (so rows also leave
    while others go on). `steps_between`: steps run after each arrival (None: each runs alone)."""
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.fallback import FallbackRunner
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest
    from tgserve.sampling.sampler import Sampler

    runner = FallbackRunner(folder, torch.float32, CPU, Sampler(400, CPU))
    kv = KVCacheManager(256, 16)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget), kv, 512, runner.decoder_start_token_id)
    engine = EngineCore(scheduler, runner)
    tokens: dict[str, list[int]] = {}

    def step():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.token_ids)

    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        scheduler.add(AddRequest(str(i), prompt, SamplingParams(), StoppingParams(max_new_tokens=n, ignore_eos=True),
                                 0.0))
        for _ in range(steps_between or 0):
            step()
        while steps_between is None and scheduler.has_work():
            step()
    while scheduler.has_work():
        step()
    assert kv.num_free_blocks == kv.pool.num_usable, "KV blocks (cross blocks included) leaked"
    assert runner.rows == [] and runner.cache is None  # the last to leave empties the batch
    return [tokens[str(i)] for i in range(len(batch))]


def test_greedy_equals_transformers_alone_batched_and_joining(family):
    """Batched: every prompt admitted in one step (encoders of different lengths side by side).
    Joining: a request arrives every 2 steps with a 16-token budget, so newcomers are appended to a
    batch whose decoders and encoders are longer or shorter than theirs, and rows leave in between."""
    name, folder = family
    batch = prompts(400, [3, 20, 45, 9, 1, 30], seed=2)
    lengths = [12, 7, 12, 3, 10, 9]
    expected = [tokens[:n] for tokens, n in zip(transformers_greedy(folder, batch, max(lengths)), lengths)]
    for budget, steps_between in ((512, None), (512, 0), (16, 2)):
        got = fallback_greedy(folder, batch, lengths, budget, steps_between)
        assert got == expected, f"{name}: budget {budget}, steps between arrivals {steps_between}"


def test_decoder_positions_past_the_first_table(tmp_path):
    """BART's decoder embeds cache length + i for every row: each row gets its own position from a
    table of the model's position embeddings, grown when a row outgrows it (64 first)."""
    folder = bart(str(tmp_path / "bart"))
    batch = prompts(400, [5, 17, 8], seed=3)
    lengths = [80, 30, 60]
    expected = [tokens[:n] for tokens, n in zip(transformers_greedy(folder, batch, max(lengths)), lengths)]
    assert fallback_greedy(folder, batch, lengths, 512, 25) == expected


def test_siblings_share_one_prefill_and_a_resumed_request_prefills_its_journal(tmp_path):
    """best_of siblings are copies of their parent's rows (encoder included); a request resumed with
    generated ids prefills start token + journal in its decoder and goes on from there."""
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.fallback import FallbackRunner
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest, Sibling
    from tgserve.sampling.sampler import Sampler

    folder = bart(str(tmp_path / "bart"))
    batch = prompts(400, [7, 25], seed=9)
    expected = transformers_greedy(folder, batch, 10)
    runner = FallbackRunner(folder, torch.float32, CPU, Sampler(400, CPU))
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64), KVCacheManager(64, 16), 512,
                          runner.decoder_start_token_id)
    engine = EngineCore(scheduler, runner)
    stopping = StoppingParams(max_new_tokens=10, ignore_eos=True)
    scheduler.add(AddRequest("a", batch[0], SamplingParams(), stopping, 0.0, siblings=[Sibling("a1", 5)]))
    scheduler.add(AddRequest("r", batch[1], SamplingParams(), stopping, 0.0, generated_ids=expected[1][:4]))
    tokens: dict[str, list[int]] = {}
    while scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    assert tokens == {"a": expected[0], "a1": expected[0], "r": expected[1][4:]}


def test_seq2seq_configs_take_the_fallback():
    from transformers import BartConfig, LlamaConfig, MarianConfig, Qwen2AudioConfig

    from tgserve.engine import fallback

    assert fallback.supports(BartConfig()) and fallback.supports(MarianConfig())
    assert fallback.supports(LlamaConfig())
    assert not fallback.supports(Qwen2AudioConfig())  # in the seq2seq table, but a decoder with an audio tower


def test_decoder_start_is_generates(tmp_path):
    from tgserve.engine.fallback import FallbackRunner
    from tgserve.sampling.sampler import Sampler

    for build_family, start in ((bart, 2), (marian, 1)):  # BART: its config's (EOS); Marian: pad
        runner = FallbackRunner(build_family(str(tmp_path / build_family.__name__)), torch.float32, CPU,
                                Sampler(400, CPU))
        assert runner.decoder_start_token_id == start


@pytest.mark.slow
def test_served_through_tgserve_and_info_names_the_path(tmp_path, server_factory):
    from models.families import check_served

    folder = bart(str(tmp_path / "bart"))
    server = server_factory(folder, *TINY_SERVER_ARGS)
    try:
        info = httpx.get(server.url + "/info").json()
        assert info["model_implementation"] == "transformers"
        assert "transformers fallback serves" in server.logs()
        check_served(server, folder)
    finally:
        server.stop()

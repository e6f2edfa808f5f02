"""T5 and mT5 (encoder-decoder) natively: the encoder runs once per request at admission, its K/V
sit in the request's own cache blocks, and the decoder steps with everything else — greedy tokens
equal transformers' generate, alone, batched, with requests joining a running batch, and served."""

from __future__ import annotations

import pytest

from models.families import build, check_greedy, family_fixture, serve_and_check

TINY = dict(vocab_size=400, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, eos_token_id=0, pad_token_id=0,
            decoder_start_token_id=0, initializer_factor=10.0)  # larger weights: outputs that vary


def t5(folder):
    from transformers import T5Config, T5ForConditionalGeneration

    return build(folder, T5Config(**TINY, feed_forward_proj="relu", tie_word_embeddings=True),
                 T5ForConditionalGeneration)


def mt5(folder):
    from transformers import MT5Config, MT5ForConditionalGeneration

    return build(folder, MT5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                 MT5ForConditionalGeneration)


FAMILIES = {"t5": t5, "mt5": mt5}


family = family_fixture(FAMILIES)


def test_greedy_equals_transformers_alone_and_batched(family):
    _, folder = family
    check_greedy(folder, n=14, lengths=[1, 9, 33, 70, 17, 40])


def test_requests_joining_a_running_batch(family):
    """Requests arrive while others decode: each is encoded in the step that admits it."""
    import torch

    from models.families import CPU, prompts, transformers_greedy
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.runner import ModelRunner
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest
    from tgserve.weights.loader import load_model

    _, folder = family
    batch = prompts(400, [12, 50, 3, 27], seed=5)
    expected = transformers_greedy(folder, batch, 10)
    model, _ = load_model(folder, torch.float32, CPU, 256)
    kv = KVCacheManager(64, 16)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64), kv, 256, model.decoder_start_token_id)
    engine = EngineCore(scheduler, ModelRunner(model, 64, 16, torch.float32, CPU))
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(batch):
        scheduler.add(AddRequest(str(i), prompt, SamplingParams(), StoppingParams(max_new_tokens=10, ignore_eos=True),
                                 0.0))
        for _ in range(3):  # the others keep decoding in between
            for o in engine.step().outputs:
                tokens.setdefault(o.request_id, []).extend(o.token_ids)
    while scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    assert [tokens[str(i)] for i in range(len(batch))] == expected
    assert kv.num_free_blocks == kv.pool.num_usable  # cross blocks came back too


@pytest.mark.slow
def test_served_through_tgserve(family, server_factory):
    _, folder = family
    serve_and_check(server_factory, folder)

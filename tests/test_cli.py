"""Flags and their environment twins become one Config."""

from __future__ import annotations

import pytest

from tgserve.cli import build_parser, config_from_args


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return config_from_args(build_parser(environ or {}).parse_args(["serve", *argv]))


def test_defaults_follow_tgi():
    cfg = parse([])
    assert cfg.server.port == 3000 and cfg.server.hostname == "0.0.0.0"
    assert cfg.server.max_concurrent_requests == 128 and cfg.server.max_best_of == 2
    assert cfg.server.max_stop_sequences == 4 and cfg.server.max_top_n_tokens == 5
    assert cfg.scheduler.max_waiting_tokens == 20
    assert cfg.model.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_environment_variables_set_flags():
    cfg = parse([], {"MODEL_ID": "/models/x", "MAX_CONCURRENT_REQUESTS": "7", "JSON_OUTPUT": "true",
                     "MAX_BATCH_PREFILL_TOKENS": "64", "WAITING_SERVED_RATIO": "0.5", "DTYPE": "bfloat16"})
    assert cfg.model.model_id == "/models/x" and cfg.model.dtype == "bfloat16"
    assert cfg.server.max_concurrent_requests == 7 and cfg.server.json_output is True
    assert cfg.scheduler.max_batch_prefill_tokens == 64 and cfg.scheduler.waiting_served_ratio == 0.5


def test_flags_win_over_environment():
    cfg = parse(["--port", "8080"], {"PORT": "9000"})
    assert cfg.server.port == 8080


def test_unknown_dtype_is_refused():
    with pytest.raises(SystemExit):
        parse(["--dtype", "int3"])

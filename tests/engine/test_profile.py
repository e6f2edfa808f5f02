"""The step profile (engine/profile.py): every step reports its seconds per phase, attention
apart from the rest of the forward pass, adding up to the step's time; /metrics sums them."""

from __future__ import annotations

import torch

from tgserve.api.metrics import Metrics
from tgserve.config import SchedulerConfig
from tgserve.engine.core import EngineCore
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.profile import PHASES
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama


def test_each_step_reports_its_phases_and_metrics_sum_them(tmp_path):
    model, _ = load_model(build_tiny_llama(str(tmp_path / "m")), torch.float32, torch.device("cpu"), 128)
    engine = EngineCore(Scheduler(SchedulerConfig(max_batch_prefill_tokens=16), KVCacheManager(32, 16), 128),
                        ModelRunner(model, 32, 16, torch.float32, torch.device("cpu")))
    for i, n in enumerate((30, 5)):
        engine.scheduler.add(AddRequest(str(i), list(range(3, 3 + n)), SamplingParams(),
                                        StoppingParams(max_new_tokens=4, ignore_eos=True), 0.0))
    metrics = Metrics()
    steps = 0
    while engine.scheduler.has_work():
        stats = engine.step().stats
        steps += 1
        assert set(stats.phases) == set(PHASES)
        assert all(v >= 0 for v in stats.phases.values()), stats.phases
        assert stats.phases["attention"] > 0 and stats.phases["forward"] > 0 and stats.phases["sample"] > 0
        assert abs(sum(stats.phases.values()) - stats.step_seconds) < 0.05 * stats.step_seconds + 1e-4
        metrics.engine_stats(stats, 0.001)
    text = metrics.render().decode()
    assert f"tgserve_engine_steps {steps}" in text
    assert 'tgserve_engine_phase_seconds{phase="attention"}' in text
    assert 'tgserve_engine_phase_seconds{phase="api_outputs"} ' + f"{0.001 * steps:.6f}" in text

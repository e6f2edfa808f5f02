"""Where an engine step's time goes: host seconds per named phase, summed over the step and sent
with its outputs (EngineStats.phases), so /metrics and the benchmark show the split.

On CPU a phase's time is its compute time; on CUDA it is the time to launch its work (the
forward's kernels run asynchronously and are waited for where the logits are read back, in
"sample"). Attention is timed inside the forward (layers/attention.py) and reported apart from
the rest of the forward pass.
"""

from __future__ import annotations

import time


PHASES = ("schedule", "inputs", "attention", "forward", "logits", "sample", "update")


class StepProfile:
    """One step's seconds per phase. `mark(phase)` charges the time since the previous mark."""

    __slots__ = ("seconds", "_last")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

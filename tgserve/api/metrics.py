"""Prometheus metrics under TGI's exact names (plus tgserve_* for what TGI has no name for).

TGI's exporter names a counter `tgi_request_count`, with no `_total` suffix and no `_created`
series; dashboards built for TGI query those names, so the text exposition is written here.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from tgserve.protocol import EngineStats

DURATION_BUCKETS = tuple(0.00015 * 1.5**k for k in range(35))
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {running + self.counts[-1]}')
        out.append(f"{name}_sum {self.sum:g}")
        out.append(f"{name}_count {running + self.counts[-1]}")
        return out


class Metrics:
    def __init__(self) -> None:
        self.request_count = 0
        self.request_success = 0
        self.request_failure: dict[str, int] = defaultdict(int)
        self.route_requests: dict[str, int] = defaultdict(int)  # tgserve_request_count{route}
        self.route_failures: dict[tuple[str, str], int] = defaultdict(int)
        self.request_duration = _Histogram(DURATION_BUCKETS)
        self.generated_tokens = _Histogram(TOKEN_BUCKETS)
        self.gauges = {"tgi_queue_size": 0, "tgi_batch_current_size": 0,
                       "tgserve_kv_cache_free_blocks": 0, "tgserve_kv_cache_total_blocks": 0}
        self.prefix_cache_hit_tokens = 0
        # the engine's step profile, summed: steps, their tokens, seconds per phase (engine/profile.py)
        self.steps = 0
        self.step_tokens = 0
        self.step_seconds = 0.0
        self.phase_seconds: dict[str, float] = defaultdict(float)

    def received(self, route: str = "/generate") -> None:
        self.request_count += 1
        self.route_requests[route] += 1

    def engine_stats(self, stats: EngineStats, output_seconds: float = 0.0) -> None:
        """A step's stats, and the API's time handling its outputs (detokenizing, stop strings, events)."""
        self.gauges.update(tgi_queue_size=stats.num_waiting, tgi_batch_current_size=stats.num_running,
                           tgserve_kv_cache_free_blocks=stats.num_free_blocks,
                           tgserve_kv_cache_total_blocks=stats.num_total_blocks)
        self.prefix_cache_hit_tokens = stats.prefix_cache_hit_tokens
        if stats.phases:  # a step ran (not an idle report)
            self.steps += 1
            self.step_tokens += stats.num_batched_tokens
            self.step_seconds += stats.step_seconds
            for phase, seconds in stats.phases.items():
                self.phase_seconds[phase] += seconds
            self.phase_seconds["api_outputs"] += output_seconds

    def success(self, seconds: float, generated_tokens: int) -> None:
        self.request_success += 1
        self.request_duration.observe(seconds)
        self.generated_tokens.observe(generated_tokens)

    def failure(self, error_type: str, route: str | None = None) -> None:
        self.request_failure[error_type] += 1
        if route is not None:
            self.route_failures[(route, error_type)] += 1

    def dropped(self) -> None:
        self.request_failure["dropped"] += 1

    def render(self) -> bytes:
        lines = ["# TYPE tgi_request_count counter", f"tgi_request_count {self.request_count}",
                 "# TYPE tgi_request_success counter", f"tgi_request_success {self.request_success}",
                 "# TYPE tgi_request_failure counter"]
        lines += [f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(self.request_failure.items())]
        lines.append("# TYPE tgi_request_duration histogram")
        lines += self.request_duration.lines("tgi_request_duration")
        lines.append("# TYPE tgi_request_generated_tokens histogram")
        lines += self.generated_tokens.lines("tgi_request_generated_tokens")
        for name, value in self.gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        total = self.gauges["tgserve_kv_cache_total_blocks"]
        used = total - self.gauges["tgserve_kv_cache_free_blocks"]
        lines += ["# TYPE tgserve_kv_cache_used_blocks gauge", f"tgserve_kv_cache_used_blocks {used}",
                  "# TYPE tgserve_kv_cache_usage_ratio gauge",
                  f"tgserve_kv_cache_usage_ratio {used / total if total else 0.0:g}",
                  "# TYPE tgserve_prefix_cache_hit_tokens counter",
                  f"tgserve_prefix_cache_hit_tokens {self.prefix_cache_hit_tokens}",
                  "# TYPE tgserve_engine_steps counter", f"tgserve_engine_steps {self.steps}",
                  "# TYPE tgserve_engine_step_tokens counter", f"tgserve_engine_step_tokens {self.step_tokens}",
                  "# TYPE tgserve_engine_step_seconds counter", f"tgserve_engine_step_seconds {self.step_seconds:.6f}",
                  "# TYPE tgserve_engine_phase_seconds counter",
                  *(f'tgserve_engine_phase_seconds{{phase="{p}"}} {v:.6f}' for p, v in self.phase_seconds.items()),
                  "# TYPE tgserve_request_count counter"]
        lines += [f'tgserve_request_count{{route="{r}"}} {n}' for r, n in sorted(self.route_requests.items())]
        lines.append("# TYPE tgserve_request_failure counter")
        lines += [f'tgserve_request_failure{{route="{r}",err="{e}"}} {n}'
                  for (r, e), n in sorted(self.route_failures.items())]
        return ("\n".join(lines) + "\n").encode()

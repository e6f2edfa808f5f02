"""The seed's own load test (its k6 scenario, TGI's early `k6/load_test.js`), replayed in Python.

Virtual users ramp 0 → 50 over 1 minute, 50 → 100 over 2 minutes and 100 → 0 over 1 minute. Each
user sends the seven requests below one after another to `/generate`, sleeping 1 s after each: five
sampled with top-p 0.9 (seed 0, as the scenario's later version), two greedy, 16-50 new tokens.
A user starts a new round of requests only while the ramp still wants it. Reported like k6: request
latency avg / min / med / max / p90 / p95, requests per second, failures (any status but 200).
`time_scale` shrinks the stages and the think time (tests run the shape in seconds).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp

from tgserve.benchmark.loadgen import request_for

STAGES = [(60.0, 50), (120.0, 100), (60.0, 0)]  # (seconds, virtual users at the stage's end)
THINK_SECONDS = 1.0

_SAMPLED = {"do_sample": True, "top_p": 0.9, "seed": 0}
_GREEDY = {"do_sample": False}
REQUESTS = [
    ("A \"whatpu\" is a small, furry animal native to Tanzania. An example of a sentence that uses the word "
     "whatpu is: We were traveling in Africa and we saw these very cute whatpus. To do a \"farduddle\" means to "
     "jump up and down really fast. An example of a sentence that uses the word farduddle is:", 32, _SAMPLED),
    ("A poem about the beauty of science by Alfred Edgar Brittle\\nTitle: The Magic Craft\\nIn the old times",
     50, _SAMPLED),
    ("استخراج العدد العاملي في لغة بايثون: ", 30, _GREEDY),
    ("Pour déguster un ortolan, il faut tout d'abord", 32, _SAMPLED),
    ("Traduce español de España a español de Argentina\nEl coche es rojo - el auto es rojo\n"
     "El ordenador es nuevo - la computadora es nueva\nel boligrafo es negro -", 16, _SAMPLED),
    ("Question: If I put cheese into the fridge, will it melt?\nAnswer:", 32, _SAMPLED),
    ("Question: Where does the Greek Goddess Persephone spend half of the year when she is not with her "
     "mother?\nAnswer:", 24, _GREEDY),
]


def target_users(elapsed: float, stages: list[tuple[float, int]]) -> float:
    """Virtual users the ramp wants `elapsed` seconds in (linear within each stage, as k6's)."""
    start_users, t = 0, 0.0
    for seconds, users in stages:
        if elapsed < t + seconds:
            return start_users + (users - start_users) * (elapsed - t) / seconds
        start_users, t = users, t + seconds
    return 0.0


async def run_seed(url: str, time_scale: float = 1.0, progress=None, protocol: str = "tgi") -> dict:
    """`protocol`: "tgi" (/generate) or "llama.cpp" (llama-server's /completion, the same requests)."""
    stages = [(seconds * time_scale, users) for seconds, users in STAGES]
    total = sum(seconds for seconds, _ in stages)
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()

    async def user(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= total:
                return
            if index >= target_users(elapsed, stages):  # not wanted now: wait for the ramp
                await asyncio.sleep(0.1 * time_scale + 0.01)
                continue
            for prompt, new_tokens, parameters in REQUESTS:
                route, body, headers = request_for(protocol, prompt, new_tokens, parameters, stream=False)
                sent = time.perf_counter()
                try:
                    async with session.post(url + route, json=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    failures += 1
                await asyncio.sleep(THINK_SECONDS * time_scale)

    async def report() -> None:
        while True:
            await asyncio.sleep(max(1.0, total / 20))
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(f"  seed scenario: {elapsed:.0f}/{total:.0f} s, {target_users(elapsed, stages):.0f} "
                         f"virtual users, {len(latencies)} requests done, {failures} failed")

    max_users = max(users for _, users in stages)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_users)) as session:
        reporter = asyncio.create_task(report())
        await asyncio.gather(*(user(i, session) for i in range(max_users)))
        reporter.cancel()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")

    return {"scenario": "seed", "requests": len(latencies), "failures": failures, "wall": wall,
            "rps": len(latencies) / wall, "avg": statistics.fmean(latencies) if latencies else float("nan"),
            "min": ordered[0] if ordered else float("nan"), "med": pct(50), "max": ordered[-1] if ordered else
            float("nan"), "p90": pct(90), "p95": pct(95)}

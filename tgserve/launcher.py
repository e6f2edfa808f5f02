"""`tgserve serve`: resolve the config, start the API and engine processes, supervise them.

A dead child is reported (a dead engine fails every in-flight request with a 424 first) and the
launcher exits non-zero; SIGINT/SIGTERM stop the API first, so in-flight requests finish while the
engine still runs, then the engine. A second signal kills both.

Sharded (`--num-shard N`), the engine is N processes, one per tensor-parallel rank. Host 0 runs
the API and rank 0, which schedules and tells the others what to compute; other hosts
(`--nnodes`, `--node-rank`) run only their ranks. Any rank that dies takes the group down: it is
reported by rank, the others are stopped, and requests in flight fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.request

import zmq

from tgserve import hardware
from tgserve.api.app import api_main
from tgserve.config import DTYPES, Config, ConfigError, ShardConfig, check_limits, cuda_graph_sizes
from tgserve.engine.core import engine_main
from tgserve.process import setup_logging
from tgserve.protocol import EngineFailed, encode, to_api_address
from tgserve.weights.locate import ModelNotFound, locate_model

log = logging.getLogger("tgserve.launcher")

DEFAULT_MAX_TOTAL_TOKENS = 4096
DEFAULT_MASTER_PORT = 29500  # torch.distributed's
# prompt tokens per step beyond the first prompt's chunk, on CPU: about where a step's matmuls stop
# getting more efficient with more rows (README: scheduling), so smaller groups cost no throughput
CPU_PREFILL_GROUP_TOKENS = 64
# glibc's malloc asks for transparent huge pages on the memory it maps (weights, KV cache): a
# decode step streams every weight, and with 2 MiB pages it misses the TLB far less (README:
# memory). Set for the engine ranks unless GLIBC_TUNABLES is already set; the kernel decides
# (/sys/kernel/mm/transparent_hugepage: "madvise" or "always"), older glibc ignores it.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
ENGINE_STOP_SECONDS = 10


# the names configs give their longest sequence (GPT-2: n_positions; ALiBi / relative models: none)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions_of(config: dict) -> int | None:
    """The model's position limit from its config.json, or None when it has none (ALiBi, T5)."""
    for sub in ("text_config",):  # multimodal wrappers keep the text model's settings apart
        if isinstance(config.get(sub), dict):
            config = {**config[sub], **config}
    return next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)


def resolve_shard(shard: ShardConfig, device: str) -> ShardConfig:
    """How many ranks, on which hosts, meeting where."""
    num_shard = shard.num_shard
    if num_shard is None:
        if not shard.sharded:
            num_shard = 1
        elif device == "cuda":
            num_shard = hardware.cuda_device_count()
        else:
            raise ConfigError("--sharded on CPU needs --num-shard (how many ranks to split the model over)")
    if num_shard < 1:
        raise ConfigError(f"--num-shard must be at least 1, not {num_shard}")
    if shard.sharded and num_shard == 1:
        raise ConfigError("--sharded needs more than one shard (--num-shard 1 was given, or one GPU is visible)")
    if shard.nnodes < 1 or num_shard % shard.nnodes:
        raise ConfigError(f"--num-shard ({num_shard}) must be a multiple of --nnodes ({shard.nnodes})")
    if not 0 <= shard.node_rank < shard.nnodes:
        raise ConfigError(f"--node-rank must be in [0, {shard.nnodes}), not {shard.node_rank}")
    per_node = num_shard // shard.nnodes
    if device == "cuda" and per_node > hardware.cuda_device_count():
        raise ConfigError(f"{per_node} ranks on this host need as many GPUs; {hardware.cuda_device_count()} are visible")
    port = shard.master_port
    if port is None:
        port = hardware.free_port() if shard.nnodes == 1 else DEFAULT_MASTER_PORT
    return dataclasses.replace(shard, num_shard=num_shard, master_port=port)


def resolve(config: Config) -> Config:
    """Fill in every default that depends on the model or the machine."""
    path = locate_model(config.model)
    device = config.model.device or hardware.default_device()
    dtype = config.model.dtype or hardware.default_dtype(device)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {DTYPES}, not {dtype!r}")
    with open(os.path.join(path, "config.json")) as f:
        max_positions = max_positions_of(json.load(f)) or DEFAULT_MAX_TOTAL_TOKENS
    server = config.server
    max_total = server.max_total_tokens or min(max_positions, DEFAULT_MAX_TOTAL_TOKENS)
    if max_total > max_positions:
        raise ConfigError(f"`max_total_tokens` ({max_total}) exceeds the model's max_position_embeddings ({max_positions})")
    max_input = server.max_input_tokens if server.max_input_tokens is not None else max_total - 1
    server = dataclasses.replace(server, max_total_tokens=max_total, max_input_tokens=max_input)
    scheduler = config.scheduler
    if scheduler.max_batch_prefill_tokens is None:
        scheduler = dataclasses.replace(scheduler, max_batch_prefill_tokens=4096 if device == "cuda" else 512)
    elif scheduler.max_batch_prefill_tokens < 1:
        raise ConfigError("`max_batch_prefill_tokens` must be > 0")
    if scheduler.prefill_group_tokens is None and device != "cuda":
        scheduler = dataclasses.replace(scheduler, prefill_group_tokens=CPU_PREFILL_GROUP_TOKENS)
    elif scheduler.prefill_group_tokens is not None and scheduler.prefill_group_tokens < 1:
        raise ConfigError("`prefill_group_tokens` must be > 0")
    check_limits(server, config.cache)
    cuda_graph_sizes(config.model.cuda_graphs)  # a bad list fails here, not in the engine
    model = dataclasses.replace(config.model, path=path, device=device, dtype=dtype)
    return config.replace(model=model, server=server, scheduler=scheduler, shard=resolve_shard(config.shard, device))


class Supervisor:
    """The children of this host: the API (host 0 only) and this host's engine ranks."""

    def __init__(self, config: Config):
        self.config = config
        self.stop_requested = threading.Event()
        self.signals = 0
        self.sharded = config.shard.num_shard > 1
        spawn = multiprocessing.get_context("spawn")
        self.api = spawn.Process(target=api_main, args=(config,), name="api") if config.shard.node_rank == 0 else None
        self.engines = {rank: spawn.Process(target=engine_main, args=(config, rank),
                                            name="engine" if rank == 0 else f"engine-{rank}")
                        for rank in config.shard.local_ranks}

    def _children(self) -> list[multiprocessing.Process]:
        return ([self.api] if self.api else []) + list(self.engines.values())

    def on_signal(self, signum: int, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second signal: killing the server")
            for process in self._children():
                self._kill(process)
        self.stop_requested.set()

    def run(self) -> int:
        for process in self._children():
            if process is not self.api:  # the engine ranks: read by the child at exec
                os.environ.setdefault("GLIBC_TUNABLES", HUGE_PAGES_TUNABLE)
            process.start()
        if self.api is not None:
            log.info("started api (pid %d) and engine (pid %d)", self.api.pid, self.engines[0].pid)
        for rank, process in self.engines.items():
            if rank or self.api is None:
                log.info("started engine rank %d of %d (pid %d)", rank, self.config.shard.num_shard, process.pid)
        if self.api is not None:
            threading.Thread(target=self._announce_ready, daemon=True).start()
        while not self.stop_requested.is_set():
            multiprocessing.connection.wait([p.sentinel for p in self._children()], timeout=0.5)
            if self.stop_requested.is_set():
                break
            dead = {rank: p.exitcode for rank, p in self.engines.items() if p.exitcode is not None}
            if dead:
                if self.api is None and 0 not in self.engines and set(dead.values()) == {0}:
                    self._stop_engines()  # rank 0 stopped the group: this host's ranks are done
                    log.info("rank 0 stopped the group")
                    return 0
                reason = "; ".join(self._describe(rank, code) for rank, code in sorted(dead.items()))
                log.error("%s", reason)
                if self.api is not None:
                    self._tell_api_engine_died(reason)
                    self._stop(self.api, self.config.server.graceful_termination_timeout)
                self._stop_engines()
                return 1
            if self.api is not None and self.api.exitcode is not None:
                log.error("api process exited with code %s", self.api.exitcode)
                self._stop_engines()
                return 1
        log.info("shutting down: letting in-flight requests finish")
        if self.api is not None:
            self._stop(self.api, self.config.server.graceful_termination_timeout + 5)
        self._stop_engines()
        log.info("stopped")
        return 0

    def _describe(self, rank: int, code: int) -> str:
        who = f"engine process (rank {rank} of {self.config.shard.num_shard})" if self.sharded else "engine process"
        if code < 0:
            try:
                return f"{who} exited with code {code} ({signal.Signals(-code).name})"
            except ValueError:
                pass
        return f"{who} exited with code {code}"

    def _stop_engines(self) -> None:
        """Rank 0 first: it tells the other ranks to stop; any rank left after that is stopped too."""
        rank0 = self.engines.get(0)
        if rank0 is not None:
            self._stop(rank0, ENGINE_STOP_SECONDS)
        deadline = time.monotonic() + ENGINE_STOP_SECONDS
        for process in self.engines.values():
            if rank0 is not None:
                process.join(max(0.0, deadline - time.monotonic()))
            self._stop(process, ENGINE_STOP_SECONDS)

    def _announce_ready(self) -> None:
        host = "127.0.0.1" if self.config.server.hostname in ("0.0.0.0", "::") else self.config.server.hostname
        url = f"http://{host}:{self.config.server.port}/health"
        while not self.stop_requested.is_set() and self.engines[0].exitcode is None and self.api.exitcode is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log.info("ready: serving %s on http://%s:%d", self.config.model.model_id,
                                 self.config.server.hostname, self.config.server.port)
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def _tell_api_engine_died(self, reason: str) -> None:
        """Fail every in-flight request now, through the API's own inbox."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(to_api_address(self.config.ipc_dir))
        sock.send(encode(EngineFailed(reason)))
        sock.close(linger=2000)
        ctx.term()

    @staticmethod
    def _stop(process: multiprocessing.Process, timeout: float) -> None:
        if process.exitcode is None and process.pid is not None:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            process.join(timeout)
        Supervisor._kill(process)

    @staticmethod
    def _kill(process: multiprocessing.Process) -> None:
        if process.exitcode is None and process.pid is not None:
            process.kill()
            process.join(5)


def serve(config: Config) -> int:
    setup_logging(config.server.json_output)
    try:
        config = resolve(config)
    except (ModelNotFound, ConfigError) as e:
        log.error("%s", e)
        return 2
    ipc_dir = tempfile.mkdtemp(prefix="tgserve-")
    supervisor = Supervisor(config.replace(ipc_dir=ipc_dir))
    signal.signal(signal.SIGINT, supervisor.on_signal)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)

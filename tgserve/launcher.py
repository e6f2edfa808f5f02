"""`tgserve serve`: resolve the config, start the API and engine processes, supervise them.

A dead child is reported (a dead engine fails every in-flight request with a 424 first) and the
launcher exits non-zero; SIGINT/SIGTERM stop the API first, so in-flight requests finish while the
engine still runs, then the engine. A second signal kills both.
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
from tgserve.config import DTYPES, Config, ConfigError, check_limits
from tgserve.engine.core import engine_main
from tgserve.process import setup_logging
from tgserve.protocol import EngineFailed, encode, to_api_address
from tgserve.weights.locate import ModelNotFound, locate_model

log = logging.getLogger("tgserve.launcher")

DEFAULT_MAX_TOTAL_TOKENS = 4096
ENGINE_STOP_SECONDS = 10


# the names configs give their longest sequence (GPT-2: n_positions; ALiBi / relative models: none)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions_of(config: dict) -> int | None:
    """The model's position limit from its config.json, or None when it has none (ALiBi, T5)."""
    for sub in ("text_config",):  # multimodal wrappers keep the text model's settings apart
        if isinstance(config.get(sub), dict):
            config = {**config[sub], **config}
    return next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)


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
    check_limits(server, config.cache)
    model = dataclasses.replace(config.model, path=path, device=device, dtype=dtype)
    return config.replace(model=model, server=server, scheduler=scheduler)


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.stop_requested = threading.Event()
        self.signals = 0
        spawn = multiprocessing.get_context("spawn")
        self.api = spawn.Process(target=api_main, args=(config,), name="api")
        self.engine = spawn.Process(target=engine_main, args=(config,), name="engine")

    def on_signal(self, signum: int, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second signal: killing the server")
            self._kill(self.api)
            self._kill(self.engine)
        self.stop_requested.set()

    def run(self) -> int:
        self.api.start()
        self.engine.start()
        log.info("started api (pid %d) and engine (pid %d)", self.api.pid, self.engine.pid)
        threading.Thread(target=self._announce_ready, daemon=True).start()
        while not self.stop_requested.is_set():
            multiprocessing.connection.wait([self.api.sentinel, self.engine.sentinel], timeout=0.5)
            if self.engine.exitcode is not None and not self.stop_requested.is_set():
                log.error("engine process exited with code %s", self.engine.exitcode)
                self._tell_api_engine_died(f"engine process exited with code {self.engine.exitcode}")
                self._stop(self.api, self.config.server.graceful_termination_timeout)
                return 1
            if self.api.exitcode is not None and not self.stop_requested.is_set():
                log.error("api process exited with code %s", self.api.exitcode)
                self._stop(self.engine, ENGINE_STOP_SECONDS)
                return 1
        log.info("shutting down: letting in-flight requests finish")
        self._stop(self.api, self.config.server.graceful_termination_timeout + 5)
        self._stop(self.engine, ENGINE_STOP_SECONDS)
        log.info("stopped")
        return 0

    def _announce_ready(self) -> None:
        host = "127.0.0.1" if self.config.server.hostname in ("0.0.0.0", "::") else self.config.server.hostname
        url = f"http://{host}:{self.config.server.port}/health"
        while not self.stop_requested.is_set() and self.engine.exitcode is None and self.api.exitcode is None:
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

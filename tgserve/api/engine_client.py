"""The API's link to the engine: admission, the request table, and the two sockets.

The API binds both sockets, so an engine (or the launcher, to report a dead engine) connects to
it. Messages to the engine leave through one ordered queue; messages from it are handled by one
task that runs `outputs.process_step` on every step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import zmq
import zmq.asyncio

from tgserve.api.errors import GenerationError, OverloadedError
from tgserve.api.metrics import Metrics
from tgserve.api.outputs import EventQueue, RequestState, process_step
from tgserve.api.tokenizer import Tokenizer
from tgserve.api.validate import ValidRequest
from tgserve.protocol import (Abort, AddRequest, EngineFailed, EngineStats, Ready, Sibling, StepOutputs, ToEngine,
                              decode_to_api, encode, to_api_address, to_engine_address)

log = logging.getLogger("tgserve.api")


class EngineClient:
    def __init__(self, ipc_dir: str, max_concurrent_requests: int, tokenizer: Tokenizer, metrics: Metrics):
        self.ipc_dir = ipc_dir
        self.max_concurrent_requests = max_concurrent_requests
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.states: dict[str, RequestState] = {}
        self.ready: Ready | None = None
        self.failed: str | None = None
        self.stats: EngineStats | None = None
        self._ids = itertools.count()
        self._outbox: asyncio.Queue[ToEngine] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._ctx: zmq.asyncio.Context | None = None

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.failed is None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.bind(to_engine_address(self.ipc_dir))
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(to_api_address(self.ipc_dir))
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._receive_loop())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._push.close(0)
            self._pull.close(0)
            self._ctx.term()

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, valids: list[ValidRequest], events: EventQueue) -> list[RequestState]:
        """Admit the validated requests of one HTTP request, all or none (429 past the limit), and
        hand them to the engine. Each sequence takes a slot (as best_of does in TGI); a request's
        siblings hang off its state. Every event lands on `events`."""
        if self.failed is not None:
            raise GenerationError(f"Server error: {self.failed}")
        if len(self.states) + sum(v.num_sequences for v in valids) > self.max_concurrent_requests:
            raise OverloadedError()
        return [self._submit(valid, events) for valid in valids]

    def _submit(self, valid: ValidRequest, events: EventQueue) -> RequestState:
        group = str(next(self._ids))
        follows = not (self.ready is not None and self.ready.encoder_decoder)
        state = RequestState(group, valid, self.tokenizer, events, follows_prompt=follows)
        state.siblings = [RequestState(f"{group}.{k}", valid, self.tokenizer, events, seed=seed, follows_prompt=follows)
                          for k, seed in enumerate(valid.sibling_seeds, start=1)]
        for s in (state, *state.siblings):
            self.states[s.request_id] = s
        self._outbox.put_nowait(AddRequest(
            state.request_id, valid.prompt_ids, valid.sampling, valid.stopping, time.time(),
            siblings=[Sibling(s.request_id, s.seed) for s in state.siblings]))
        return state

    def abort(self, state: RequestState) -> None:
        """The client went away: forget the request (all its sequences) and free its engine resources."""
        group = [state.request_id, *(s.request_id for s in state.siblings)]
        live = [r for r in group if self.states.pop(r, None) is not None]
        if live:
            self.metrics.dropped()
            self._outbox.put_nowait(Abort(live))

    def _abort_many(self, request_ids: list[str]) -> None:
        self._outbox.put_nowait(Abort(request_ids))

    # ---- socket loops -------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            await self._push.send(encode(message))

    async def _receive_loop(self) -> None:
        while True:
            message = decode_to_api(await self._pull.recv())
            if isinstance(message, StepOutputs):
                start = time.perf_counter()
                process_step(message, self.states, self.tokenizer, self._abort_many)
                self.stats = message.stats
                self.metrics.engine_stats(message.stats, time.perf_counter() - start)
            elif isinstance(message, Ready):
                self.ready = message
                log.info("engine ready: KV cache of %d tokens (%s, %s)",
                         message.max_batch_total_tokens, message.dtype, message.device)
            elif isinstance(message, EngineFailed):
                self._engine_failed(message.reason)

    def _engine_failed(self, reason: str) -> None:
        log.error("engine failed: %s", reason)
        self.failed = reason
        error = GenerationError(f"Server error: {reason}")
        for state in self.states.values():
            state.fail(error)
        self.states.clear()

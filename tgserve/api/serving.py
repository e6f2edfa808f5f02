"""Running validated requests for either front door (TGI's routes, OpenAI's): submit them, then
wait for every sequence's end or stream their events, aborting in the engine when the client
leaves or one sequence fails. The routes only translate to and from their wire format."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request

from tgserve.api.engine_client import EngineClient
from tgserve.api.errors import InferError
from tgserve.api.metrics import Metrics
from tgserve.api.openai_requests import OpenAITranslator
from tgserve.api.outputs import EventQueue, FinalResult, RequestState, StreamEvent
from tgserve.api.validate import ValidRequest, Validator
from tgserve.config import Config


@dataclass(slots=True)
class ApiContext:
    """What every route reads: built once by app.py."""

    config: Config
    validator: Validator
    client: EngineClient
    metrics: Metrics
    openai: OpenAITranslator | None = None
    started: int = 0  # unix time the API started (OpenAI's `created` of the model)


class ClientGone(Exception):
    pass


@dataclass(slots=True)
class Submitted:
    """Everything one HTTP request asked for: its requests (each with its siblings) and the one
    queue their events arrive on."""

    client: EngineClient
    roots: list[RequestState]
    events: EventQueue

    @property
    def sequences(self) -> list[RequestState]:
        return [s for root in self.roots for s in (root, *root.siblings)]

    def abort(self) -> None:
        for root in self.roots:
            self.client.abort(root)


def submit(client: EngineClient, valids: list[ValidRequest]) -> Submitted:
    events: EventQueue = asyncio.Queue()
    return Submitted(client, client.submit(valids, events), events)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _all_ends(submitted: Submitted) -> None:
    remaining = len(submitted.sequences)
    while remaining:
        _, event = await submitted.events.get()
        if isinstance(event, InferError):
            raise event
        if event.final is not None:
            remaining -= 1


async def collect(submitted: Submitted, request: Request) -> dict[str, FinalResult]:
    """Every sequence's final result, by request id. A client that disconnects first has its
    requests aborted (ClientGone); a failed sequence aborts the rest and raises its error."""
    work = asyncio.ensure_future(_all_ends(submitted))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work not in done:
        work.cancel()
        submitted.abort()
        raise ClientGone()
    try:
        work.result()
    except InferError:
        submitted.abort()
        raise
    return {s.request_id: s.final for s in submitted.sequences}


async def stream(submitted: Submitted) -> AsyncIterator[tuple[RequestState, StreamEvent]]:
    """Each sequence's events as they come; raises the first error. Leaving early (the client
    went away, or an error) aborts whatever still runs."""
    remaining = len(submitted.sequences)
    try:
        while remaining:
            state, event = await submitted.events.get()
            if isinstance(event, InferError):
                raise event
            if event.final is not None:
                remaining -= 1
            yield state, event
    finally:
        if remaining:
            submitted.abort()

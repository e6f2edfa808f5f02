"""Per-step cost of the API↔engine protocol: one StepOutputs of N requests, encoded, sent over the
ipc:// socket, received and decoded (what every engine step pays), plus an AddRequest round trip.

    python -m bench.protocol_cost
"""

from __future__ import annotations

import tempfile
import time

import zmq

from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import (AddRequest, EngineStats, SeqOutput, StepOutputs, decode_to_api, decode_to_engine,
                              encode, to_api_address)


def measure(num_outputs: int, rounds: int = 5000) -> float:
    ipc_dir = tempfile.mkdtemp()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(to_api_address(ipc_dir))
    push = ctx.socket(zmq.PUSH)
    push.connect(to_api_address(ipc_dir))
    step = StepOutputs([SeqOutput(str(i), [1234], [-0.5]) for i in range(num_outputs)],
                       EngineStats(num_outputs, 0, 1000, 2000, num_outputs, 0.05))
    for _ in range(100):
        push.send(encode(step))
        decode_to_api(pull.recv())
    start = time.perf_counter()
    for _ in range(rounds):
        push.send(encode(step))
        decode_to_api(pull.recv())
    elapsed = (time.perf_counter() - start) / rounds
    push.close(0)
    pull.close(0)
    ctx.term()
    return elapsed


def main() -> None:
    for n in (1, 32, 256):
        print(f"StepOutputs with {n:3d} requests: {measure(n) * 1e6:7.1f} us per step (encode+send+recv+decode)")
    add = AddRequest("1", list(range(40)), SamplingParams(), StoppingParams(max_new_tokens=128), 0.0)
    start = time.perf_counter()
    for _ in range(10000):
        decode_to_engine(encode(add))
    print(f"AddRequest encode+decode: {(time.perf_counter() - start) / 10000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()

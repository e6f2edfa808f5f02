"""A stand-in for llama.cpp's `llama-server` and `llama-quantize`, for `tgserve bench --peer` tests
(building the real one takes minutes). It speaks the part of llama-server's API the benchmark uses,
in the shape the real server answers (/health; /completion streamed as one `data:` event per token,
then a final event with stop true and no token; or one JSON object), and logs its command line and
every request body to $FAKE_LLAMA_LOG.

    fake_llama_server.py llama-server -m MODEL --port P ...
    fake_llama_server.py llama-quantize --allow-requantize IN OUT TYPE
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys

from aiohttp import web


def log(entry: dict) -> None:
    with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


async def completion(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    log({"request": body})
    n = body["n_predict"]
    if not body.get("stream"):
        return web.json_response({"content": " x" * n, "tokens": [], "stop": True, "tokens_predicted": n})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(n):
        await asyncio.sleep(0.001)
        event = {"index": 0, "content": " x", "tokens": [100 + i], "stop": False, "tokens_predicted": i + 1}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    final = {"index": 0, "content": "", "tokens": [], "stop": True, "tokens_predicted": n, "timings": {}}
    await response.write(f"data: {json.dumps(final)}\n\n".encode())
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    tool, args = sys.argv[1], sys.argv[2:]
    log({"tool": tool, "argv": args})
    if tool == "llama-quantize":
        _, source, out, _kind = args
        shutil.copyfile(source, out)
        return
    app = web.Application()
    app.router.add_post("/completion", completion)
    app.router.add_get("/health", health)
    web.run_app(app, host=args[args.index("--host") + 1], port=int(args[args.index("--port") + 1]), print=None)


if __name__ == "__main__":
    main()

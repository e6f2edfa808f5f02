"""Two hosts, one sharded model: each `tgserve serve` runs in its own network namespace (its own
interfaces, addresses and loopback, as on a separate machine), joined only by a veth pair. Node 0
gets TGI's flags (--nnodes 2 --node-rank 0 --master-addr ...), node 1 torch.distributed's
rendezvous environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK), as torchrun would give it.
The API runs on node 0 only and is queried from inside its namespace; the tokens must be
transformers' greedy tokens. Needs root and iproute2: elsewhere the test says why it skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY_SERVER_ARGS

pytestmark = pytest.mark.slow

SUFFIX = f"{os.getpid() % 100000}"
NAMESPACES = (f"tgs-a-{SUFFIX}", f"tgs-b-{SUFFIX}")
VETHS = (f"tgsa{SUFFIX}", f"tgsb{SUFFIX}")  # interface names: at most 15 characters
ADDRESSES = ("10.213.7.1", "10.213.7.2")
API_PORT, MASTER_PORT = 8080, 29511  # each namespace has its own ports: no clash with the host's

# run inside node 0's namespace: wait for /health, then the prompts at once; prints their tokens
CLIENT = textwrap.dedent("""
    import json, sys, time
    from concurrent.futures import ThreadPoolExecutor
    import httpx
    url, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit("server not healthy after 240 s")
        time.sleep(0.2)
    def ask(text):
        r = httpx.post(url + "/generate", timeout=120, json={"inputs": text, "parameters": {
            "max_new_tokens": n, "details": True, "ignore_eos_token": True}})
        r.raise_for_status()
        return [t["id"] for t in r.json()["details"]["tokens"]]
    with ThreadPoolExecutor(len(prompts)) as pool:
        print(json.dumps(list(pool.map(ask, prompts))))
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces joined by a veth pair, addressed 10.213.7.1 and .2; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces and a veth pair needs root")
    try:
        for ns in NAMESPACES:
            _ip("netns", "add", ns)
        _ip("link", "add", VETHS[0], "type", "veth", "peer", "name", VETHS[1])
        for ns, veth, address in zip(NAMESPACES, VETHS, ADDRESSES):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns in NAMESPACES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: `{' '.join(e.cmd)}` said {e.stderr.strip()!r}")
    yield
    for ns in NAMESPACES:  # deleting a namespace deletes its end of the veth pair, and the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def test_two_ranks_on_two_hosts_serve_transformers_greedy_tokens(two_hosts, tmp_path):
    from transformers import AutoTokenizer

    from models.families import transformers_greedy
    from models.test_llama_family import llama_3_groups

    folder = llama_3_groups(str(tmp_path / "model"))
    texts = ["Hello world!", "Two hosts, one model, and a veth pair between them."]
    tok = AutoTokenizer.from_pretrained(folder)
    expected = transformers_greedy(folder, [tok(t).input_ids for t in texts], 8)

    serve = [sys.executable, "-m", "tgserve", "serve", "--model-id", folder, *TINY_SERVER_ARGS]
    node0 = _in(NAMESPACES[0], *serve, "--hostname", "127.0.0.1", "--port", str(API_PORT), "--num-shard", "2",
                "--nnodes", "2", "--node-rank", "0", "--master-addr", ADDRESSES[0], "--master-port", str(MASTER_PORT))
    node1 = _in(NAMESPACES[1], *serve)
    # gloo binds each rank to the interface named here (the veth: the only way to the other host)
    env0 = {**os.environ, "GLOO_SOCKET_IFNAME": VETHS[0]}
    env1 = {**os.environ, "GLOO_SOCKET_IFNAME": VETHS[1], "MASTER_ADDR": ADDRESSES[0],
            "MASTER_PORT": str(MASTER_PORT), "WORLD_SIZE": "2", "RANK": "1"}
    logs = [open(tmp_path / f"node{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
             for cmd, env, log in zip((node0, node1), (env0, env1), logs)]
    try:
        client = subprocess.run(_in(NAMESPACES[0], sys.executable, "-c", CLIENT, f"http://127.0.0.1:{API_PORT}",
                                    json.dumps(texts), "8"), capture_output=True, text=True, timeout=300)
        node_logs = "\n".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
        assert client.returncode == 0, client.stderr + node_logs
        assert json.loads(client.stdout) == expected
        assert "started engine rank 1 of 2" in (tmp_path / "node1.log").read_text()  # and no API there
        assert "api" not in (tmp_path / "node1.log").read_text()
        assert "float32 on cpu, 2 ranks" in (tmp_path / "node0.log").read_text()
        # node 0 stopped (SIGTERM): rank 0 ends the group, and node 1's launcher exits cleanly too
        procs[0].terminate()
        assert procs[0].wait(60) == 0
        assert procs[1].wait(60) == 0, (tmp_path / "node1.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

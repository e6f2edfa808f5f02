"""Starting and stopping the servers a benchmark measures (tgserve, llama-server)."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def launch(cmd: list[str], port: int, log: str, name: str, timeout: float = 300) -> subprocess.Popen:
    """Run `cmd`, its output into the file `log` (never an unread pipe: a chatty server would fill
    it and stall), and return once http://127.0.0.1:port/health answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"{name} exited ({proc.returncode}); its log {log}:\n{f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"{name} did not become healthy in {timeout:.0f} s (log: {log})")


def stop(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM, then SIGKILL if it has not stopped in `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

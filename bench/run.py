"""The benchmark run (`make bench`): the same as `tgserve bench` (tgserve/benchmark/sweep.py) — the
transformers baselines, then the server under 1/16/32/64 concurrent streaming clients.

    python -m bench.run                      # default model, the server's default dtype
    python -m bench.run --dtype bfloat16 --concurrency 1,16,32,64 --max-new-tokens 128
"""

from __future__ import annotations

import sys

from tgserve.benchmark.sweep import main

if __name__ == "__main__":
    sys.exit(main())

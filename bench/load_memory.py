"""Resident memory while loading a checkpoint, against the size of its weights.

    python -m bench.load_memory                   # the default model, as a bfloat16 checkpoint
    python -m bench.load_memory --model-id DIR --dtype bfloat16
    python -m bench.load_memory --num-shard 2      # each rank of 2, against one shard, same run

Loads in a fresh process, samples VmRSS every millisecond while `load_model` runs, and prints the
checkpoint's size, the peak growth and the growth left once loading is done (imports excluded).
On CPU the growth includes the oneDNN-packed copy of a tied LM head (the embedding keeps its own).
With --num-shard N it also loads N tensor-parallel ranks at once (each a process in one gloo
group, as `tgserve serve --num-shard N` runs them) and prints each rank's growth, and its
anonymous memory (RssAnon: what the rank holds itself, without the file pages its memory-mapped
reads touched, which the page cache shares between ranks), against the one-shard figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

MEASURE = r"""
import sys, threading, time, torch
from transformers import AutoConfig
import tgserve.models.llama
from tgserve import distributed
from tgserve.weights.loader import load_model
from tgserve.weights.safetensors import read_header, safetensors_files

AutoConfig.from_pretrained(sys.argv[1])  # the modules it imports are not the weights' cost
weights = sum(info["data_offsets"][1] - info["data_offsets"][0]
              for path in safetensors_files(sys.argv[1]) for info in read_header(path)[0].values())
rank, world, port = (int(x) for x in sys.argv[3:6])
quantize = sys.argv[6] if len(sys.argv) > 6 else None
if quantize and quantize.startswith("bitsandbytes"):
    import bitsandbytes  # its import is not the weights' cost
distributed.init(rank, world, "gloo", f"tcp://127.0.0.1:{port}")  # the group's memory is not the weights'

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

def rss():
    return status("VmRSS")

base, anon, peak, running = rss(), status("RssAnon"), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
model, _ = load_model(sys.argv[1], getattr(torch, sys.argv[2]), torch.device("cpu"), 2048, quantize)
running[0] = False
thread.join()
print(weights, max(peak[0], rss()) - base, rss() - base, status("RssAnon") - anon)
distributed.shutdown()
"""


def measure(folder: str, dtype: str, world: int = 1, quantize: str | None = None) -> list[tuple[int, int, int, int]]:
    """(checkpoint bytes, peak growth, growth once loaded, anonymous growth) of each of `world`
    ranks loading `folder` in fresh processes."""
    from tgserve.hardware import free_port

    port = free_port()
    extra = [quantize] if quantize else []
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE, folder, dtype, str(rank), str(world), str(port), *extra],
                              stdout=subprocess.PIPE, text=True) for rank in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return [tuple(int(x) for x in out.split()[-4:]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None, help="a model folder (default: the default model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-shard", type=int, default=1, help="also load this many tensor-parallel ranks")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    from tgserve.config import ModelConfig
    from tgserve.weights.locate import locate_model

    source = args.model_id or locate_model(ModelConfig())
    with tempfile.TemporaryDirectory() as folder:
        for name in os.listdir(source):  # the checkpoint in the dtype it is loaded in
            path = os.path.join(source, name)
            if name.endswith(".safetensors"):
                tensors = load_file(path)
                save_file({k: v.to(getattr(torch, args.dtype)) for k, v in tensors.items()},
                          os.path.join(folder, name), metadata={"format": "pt"})
            elif os.path.isfile(path):
                shutil.copy(path, folder)
        one = measure(folder, args.dtype, 1)[0]
        ranks = measure(folder, args.dtype, args.num_shard) if args.num_shard > 1 else []
    weights, peak, after, anon = one
    mib = 2**20
    print(f"{source} as {args.dtype}: weights {weights / mib:.1f} MiB; resident memory grew by "
          f"{peak / mib:.1f} MiB at the peak of loading ({peak / weights:.2f}x the weights) and "
          f"{after / mib:.1f} MiB once loaded ({anon / mib:.1f} MiB anonymous)")
    for rank, (_, r_peak, r_after, r_anon) in enumerate(ranks):
        print(f"  rank {rank} of {args.num_shard}: peak {r_peak / mib:.1f} MiB ({r_peak / peak:.2f}x one shard's), "
              f"once loaded {r_after / mib:.1f} MiB ({r_after / after:.2f}x), anonymous {r_anon / mib:.1f} MiB "
              f"({r_anon / anon:.2f}x)")


if __name__ == "__main__":
    main()

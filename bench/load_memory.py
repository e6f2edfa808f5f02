"""Resident memory while loading a checkpoint, against the size of its weights.

    python -m bench.load_memory                   # the default model, as a bfloat16 checkpoint
    python -m bench.load_memory --model-id DIR --dtype bfloat16

Loads in a fresh process, samples VmRSS every millisecond while `load_model` runs, and prints the
checkpoint's size, the peak growth and the growth left once loading is done (imports excluded).
On CPU the growth includes the oneDNN-packed copy of a tied LM head (the embedding keeps its own).
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
from tgserve.weights.loader import load_model
from tgserve.weights.safetensors import read_header, safetensors_files

AutoConfig.from_pretrained(sys.argv[1])  # the modules it imports are not the weights' cost
weights = sum(info["data_offsets"][1] - info["data_offsets"][0]
              for path in safetensors_files(sys.argv[1]) for info in read_header(path)[0].values())

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

base, peak, running = rss(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
model, _ = load_model(sys.argv[1], getattr(torch, sys.argv[2]), torch.device("cpu"), 2048)
running[0] = False
thread.join()
print(weights, max(peak[0], rss()) - base, rss() - base)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None, help="a model folder (default: the default model)")
    parser.add_argument("--dtype", default="bfloat16")
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
        out = subprocess.run([sys.executable, "-c", MEASURE, folder, args.dtype], capture_output=True, text=True,
                             check=True)
    weights, peak, after = (int(x) for x in out.stdout.split())
    mib = 2**20
    print(f"{source} as {args.dtype}: weights {weights / mib:.1f} MiB; resident memory grew by "
          f"{peak / mib:.1f} MiB at the peak of loading ({peak / weights:.2f}x the weights) and "
          f"{after / mib:.1f} MiB once loaded")


if __name__ == "__main__":
    main()

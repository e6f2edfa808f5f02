"""Decode steps replayed as CUDA graphs (`--cuda-graphs`, TGI's flag: the batch sizes to capture).

On a GPU a decode step of a small model, or of a large one at few streams, is bound by the host:
hundreds of kernel launches, each a few microseconds of Python and driver work. A CUDA graph
records a step's kernels once and replays them with one launch. A graph's shapes and addresses are
fixed, so a step runs as the graph captured for (B, W):

- B, the smallest of the configured batch sizes that holds the step's d decode rows; the B - d rows
  after them are padding: token 0 at position 0, its K/V written to slot 0 of the null block, its
  one key that same slot (finite values no real row reads: a real row masks every key past its own
  length, and padded block-table entries are past it);
- W, the smallest power of two that holds the step's widest block table (attention gathers
  B x W blocks per layer, so W follows the longest context rather than the longest allowed).

Each graph reads its inputs from one device buffer of its own (token ids, positions, cache slots,
key counts, block table; int64), filled by one host-to-device copy per step from a pinned buffer,
and writes the logits of all B rows to a tensor of its own, which the sampler reads before the next
step. Graphs are captured on first use and share one memory pool (one step runs at a time). Only
steps that are decodes alone, with no prompt logprobs, no cross-attention and at most the largest
batch size run as graphs; every other step (prefill, chunked prefill mixed with decodes, bigger
batches) runs eagerly, as on the CPU. A model whose step cannot be captured (one that reads a
tensor on the host mid-step, as MoE routing does to size its expert groups) logs why and runs
eagerly from then on.

`capture=False` runs the same static buffers and padding eagerly (on any device): what the tests
check on a machine without a GPU, against transformers, and on the meta device, where a step that
reads a tensor on the host fails as it would during a capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tgserve.engine.inputs import StepInputs
from tgserve.layers.attention import NULL_BLOCK, AttentionInputs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Graph:
    batch: int
    width: int
    inputs: torch.Tensor  # [4 * batch + batch * width] int64 on the device: ids, positions, slots, lens, table
    logits: torch.Tensor | None = None  # [batch, vocab] float32, written by each replay
    graph: object | None = None  # torch.cuda.CUDAGraph; None: run eagerly


class DecodeGraphs:
    """Runs eligible decode steps through static, padded inputs: captured CUDA graphs, or eagerly."""

    def __init__(self, model: nn.Module, device: torch.device, sizes: tuple[int, ...], block_size: int,
                 capture: bool = True):
        self.model, self.device, self.sizes, self.block_size = model, device, tuple(sorted(sizes)), block_size
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.disabled: str | None = None  # why graphs stopped (a failed capture), or None
        self._pool = None
        self._host = torch.empty(0, dtype=torch.int64)
        self._copied = None  # CUDA event: the last host-to-device copy finished (the pinned buffer is free)

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """The float32 logits of the step's sampling rows, or None: run this step eagerly."""
        d = step.num_decode
        if (self.disabled or d == 0 or len(step.input_ids) != d or step.cross is not None
                or step.row_table is not None or len(step.logprob_rows) or d > self.sizes[-1]):
            return None
        batch = next(b for b in self.sizes if b >= d)
        width = 1 << (step.decode_table.shape[1] - 1).bit_length()
        graph = self.graphs.get((batch, width))
        if graph is None:
            try:
                graph = self._build(batch, width)
            except Exception as e:  # noqa: BLE001 — a model that cannot be captured runs eagerly
                self.disabled = f"{type(e).__name__}: {e}"
                log.warning("CUDA graphs off for this model: capturing a decode step of batch %d failed (%s); "
                            "every step runs eagerly", batch, self.disabled)
                return None
            self.graphs[(batch, width)] = graph
        self._fill(graph, step)
        self.launch(graph)
        if np.array_equal(step.sample_indices, np.arange(d)):
            return graph.logits[:d]
        return graph.logits.index_select(0, torch.from_numpy(step.sample_indices).to(self.device))

    def launch(self, graph: _Graph) -> None:
        """Run the graph on the inputs in its buffer: a replay, or (not captured) the same forward
        eagerly; its logits land in graph.logits."""
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph.logits = self._forward(graph)

    def _views(self, graph: _Graph) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        b, w, buf = graph.batch, graph.width, graph.inputs
        # a fresh AttentionInputs per call: its masks are built from the static lengths inside the graph
        attn = AttentionInputs(slot_mapping=buf[2 * b:3 * b], num_decode=b, block_size=self.block_size,
                               decode_block_table=buf[4 * b:].view(b, w), decode_seq_lens=buf[3 * b:4 * b],
                               prefills=())
        return buf[:b], buf[b:2 * b], attn

    def _forward(self, graph: _Graph) -> torch.Tensor:
        ids, positions, attn = self._views(graph)
        hidden = self.model(ids, positions, attn)
        return self.model.compute_logits(hidden).float()

    def _fill(self, graph: _Graph, step: StepInputs) -> None:
        """The step's inputs, padded to the graph's shape, into its device buffer (one copy)."""
        b, w, d = graph.batch, graph.width, step.num_decode
        n = graph.inputs.numel()
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the pinned buffer
        if self._host.numel() < n:
            self._host = torch.empty(n, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        host = self._host[:n].numpy()
        for at, real, pad in ((0, step.input_ids, 0), (b, step.positions, 0),
                              (2 * b, step.slot_mapping, NULL_BLOCK * self.block_size),
                              (3 * b, step.decode_lens, 1)):
            host[at:at + d] = real
            host[at + d:at + b] = pad
        table = host[4 * b:].reshape(b, w)
        table.fill(NULL_BLOCK)
        table[:d, :step.decode_table.shape[1]] = step.decode_table
        graph.inputs.copy_(self._host[:n], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _build(self, batch: int, width: int) -> _Graph:
        graph = _Graph(batch, width, torch.zeros(4 * batch + batch * width, dtype=torch.int64, device=self.device))
        graph.inputs[3 * batch:4 * batch] = 1  # every padded row sees one key
        if not self.capture:
            return graph
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # first-use work (library handles, lazy buffers) happens outside the capture
                self._forward(graph)
        torch.cuda.current_stream(self.device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
            graph.logits = self._forward(graph)
        self._pool = cuda_graph.pool()
        graph.graph = cuda_graph
        log.info("captured a CUDA graph for decode steps of batch %d, block tables of %d blocks", batch, width)
        return graph

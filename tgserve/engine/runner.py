"""Runs one StepPlan: block copies → flat inputs → model forward → logits of the sampling rows →
sampled tokens (and, for requests that asked, the logprobs of the prompt tokens just computed).

Owns the KV-cache tensors (bound once to the model's attention layers) and their sizing, and the
sampler with its per-sequence state. In a sharded engine rank 0 runs `execute` (and sends each
step's inputs to the other ranks first); the other ranks run only `forward`, on the inputs they get.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from tgserve.engine.graphs import DecodeGraphs
from tgserve.engine.inputs import StepInputs, prompt_logprob_spans, step_inputs
from tgserve.engine.profile import StepProfile
from tgserve.layers.attention import AttentionClock
from tgserve.engine.scheduler import StepPlan
from tgserve.params import SamplingParams
from tgserve.sampling.sampler import Sampler, SampledTokens

log = logging.getLogger(__name__)

MAX_AUTO_KV_TOKENS = 1 << 20
HEARTBEAT_SECONDS = 60.0  # well inside distributed.TIMEOUT
PROMPT_LOGITS_ROWS = 256  # prompt logprobs are computed this many positions at a time (memory bound)


class GroupFailed(RuntimeError):
    """A sharded step failed on rank 0 or lost a rank: the engine cannot continue."""


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    layers = model.attention_layers()
    first = layers[0]
    return len(layers) * 2 * first.num_kv_heads * first.head_dim * torch.finfo(dtype).bits // 8


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds for its weights: parameters, buffers (quantized weights,
    scales, rotary tables) and tensors kept as attributes (a oneDNN-packed weight), each counted once
    (before the KV cache is bound to the attention layers)."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            try:  # one tensor seen through two modules (a tied weight, a view of it) counts once
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            except RuntimeError:  # an opaque oneDNN tensor: no storage to look at
                key = id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def plan_num_blocks(bytes_per_token: int, block_size: int, max_batch_total_tokens: int | None,
                    available_bytes: int, memory_fraction: float) -> int:
    """Blocks for the requested token capacity, or for what fits in a fraction of free memory."""
    if max_batch_total_tokens is None:
        tokens = int(available_bytes * memory_fraction) // bytes_per_token
        max_batch_total_tokens = min(tokens, MAX_AUTO_KV_TOKENS)
    return max_batch_total_tokens // block_size + 1  # + the null block


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, sampler: Sampler | None = None, graph_sizes: tuple[int, ...] = (),
                 capture_graphs: bool | None = None):
        """graph_sizes: the batch sizes whose decode steps run through DecodeGraphs (captured as CUDA
        graphs when capture_graphs, by default on CUDA; else run eagerly through the same padding)."""
        self.model, self.block_size, self.device = model, block_size, device
        self._sampler = sampler
        self.broadcast = None  # sharded: sends each step's StepInputs to the other ranks (set by the engine)
        self._last_sent = time.monotonic()
        weights = weight_bytes(model)  # before the KV cache tensors join the layers
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            # zeros, not empty: attention reads whole blocks and masks the slots past a sequence's
            # end, but a masked NaN left in reused memory still poisons the sum (0 * NaN = NaN).
            # Committing the memory now also makes a too-large cache fail at start-up, not mid-run.
            layer.bind_cache(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))
        log.info("weights: %.1f MiB; KV cache: %d blocks of %d tokens (%.2f GiB)", weights / 2**20,
                 num_blocks - 1, block_size, num_blocks * block_size * kv_bytes_per_token(model, dtype) / 2**30)
        capture = device.type == "cuda" if capture_graphs is None else capture_graphs
        self.graphs = DecodeGraphs(model, device, graph_sizes, block_size, capture) if graph_sizes else None

    @property
    def sampler(self) -> Sampler:
        if self._sampler is None:  # no sampler given: a plain one over the model's vocabulary
            self._sampler = Sampler(self.model.lm_head.vocab_size, self.device)
        return self._sampler

    @torch.inference_mode()
    def execute(self, plan: StepPlan, profile: StepProfile | None = None) -> SampledTokens:
        """Rank 0: the plan's inputs (sent to the other ranks when sharded), the forward pass, sampling;
        each phase's time charged to `profile`."""
        profile = profile or StepProfile()
        step = step_inputs(plan, self.block_size)
        seqs = plan.sample_seqs
        prepared = self.sampler.prepare(seqs) if seqs else None  # grammar masks start computing now
        if self.broadcast is None:
            logits, prompt_values = self.forward(step, profile)
        else:
            try:
                self._send(step)
                logits, prompt_values = self.forward(step, profile)
            except Exception as e:  # the other ranks are in (or past) this step: the group cannot go on
                raise GroupFailed(f"tensor-parallel step failed: {type(e).__name__}: {e}") from e
        prompt_logprobs = {}
        if prompt_values is not None:
            values, at = prompt_values.tolist(), 0
            for index, first, last in prompt_logprob_spans(plan):
                prompt_logprobs[index] = values[at:at + last - first]
                at += last - first
        if prepared is None:
            profile.mark("sample")
            return SampledTokens([], [], prompt_logprobs=prompt_logprobs)
        sampled = self.sampler.sample(logits, prepared)
        profile.mark("sample")
        return dataclasses.replace(sampled, prompt_logprobs=prompt_logprobs) if prompt_logprobs else sampled

    @torch.inference_mode()
    def forward(self, step: StepInputs, profile: StepProfile | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every rank: block copies, the model, and the logits of the sampling rows (float32) and the
        prompt logprobs asked for (log_softmax of the raw logits at the next prompt token)."""
        profile = profile or StepProfile()
        if step.block_copies:
            self._copy_blocks(step.block_copies)
        if self.graphs is not None and (logits := self.graphs.run(step)) is not None:
            profile.mark("forward")  # a replay: inputs, attention and logits are inside it
            return logits, None
        inputs = step.to_device(self.device)
        profile.mark("inputs")
        AttentionClock.take()
        if inputs.cross is not None:  # an encoder-decoder: encode the new requests, then decode
            if inputs.cross.encode is not None:
                self.model.encode(inputs.cross.encode)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, inputs.cross)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn)  # [tokens, hidden]
        profile.mark("forward")
        attention = AttentionClock.take()
        profile.add("attention", attention)
        profile.add("forward", -attention)  # "forward" is the rest of the model
        prompt_values = self._prompt_logprobs(step, hidden) if len(step.logprob_rows) else None
        logits = None
        if len(step.sample_indices):
            logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_indices)).float()
        profile.mark("logits")
        return logits, prompt_values

    def keep_alive(self) -> None:
        """Idle rank 0 of a sharded engine: tell the other ranks now and then that it is alive (their
        wait for the next step would otherwise time out)."""
        if self.broadcast is not None and time.monotonic() - self._last_sent > HEARTBEAT_SECONDS:
            try:
                self._send("alive")
            except Exception as e:
                raise GroupFailed(f"tensor-parallel group lost: {type(e).__name__}: {e}") from e

    def _send(self, message: object) -> None:
        self.broadcast(message)
        self._last_sent = time.monotonic()

    def admit(self, request_id: str, sampling: SamplingParams, generated: list[int]) -> None:
        """A request arrived (grammar matchers start building during its prefill)."""
        self.sampler.begin(request_id, sampling, generated)

    def release(self, request_ids: list[str]) -> None:
        """Forget the sampler state of sequences that ended."""
        if request_ids and self._sampler is not None:
            self._sampler.release(request_ids)

    def _copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        src = torch.tensor([c[0] for c in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.long, device=self.device)
        for layer in self.model.attention_layers():
            for cache in (layer.k_cache, layer.v_cache):
                cache.index_copy_(0, dst, cache.index_select(0, src))

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """A bounded number of rows at a time: each needs a whole vocabulary of logits."""
        rows = torch.from_numpy(step.logprob_rows).to(self.device)
        targets = torch.from_numpy(step.logprob_targets).to(self.device)
        pieces = []
        for at in range(0, len(rows), PROMPT_LOGITS_ROWS):
            logits = self.model.compute_logits(hidden.index_select(0, rows[at:at + PROMPT_LOGITS_ROWS])).float()
            pieces.append(logits.log_softmax(dim=-1).gather(1, targets[at:at + PROMPT_LOGITS_ROWS, None]).squeeze(1))
        return torch.cat(pieces)

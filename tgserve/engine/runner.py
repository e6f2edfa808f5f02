"""Runs one StepPlan: block copies → flat inputs → model forward → logits of the sampling rows →
sampled tokens (and, for requests that asked, the logprobs of the prompt tokens just computed).

Owns the KV-cache tensors (bound once to the model's attention layers) and their sizing, and the
sampler with its per-sequence state.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import nn

from tgserve.engine.inputs import BatchInputs, build_inputs
from tgserve.engine.scheduler import StepPlan
from tgserve.params import SamplingParams
from tgserve.sampling.sampler import Sampler, SampledTokens

log = logging.getLogger(__name__)

MAX_AUTO_KV_TOKENS = 1 << 20
PROMPT_LOGITS_ROWS = 256  # prompt logprobs are computed this many positions at a time (memory bound)


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    layers = model.attention_layers()
    first = layers[0]
    return len(layers) * 2 * first.num_kv_heads * first.head_dim * torch.finfo(dtype).bits // 8


def plan_num_blocks(bytes_per_token: int, block_size: int, max_batch_total_tokens: int | None,
                    available_bytes: int, memory_fraction: float) -> int:
    """Blocks for the requested token capacity, or for what fits in a fraction of free memory."""
    if max_batch_total_tokens is None:
        tokens = int(available_bytes * memory_fraction) // bytes_per_token
        max_batch_total_tokens = min(tokens, MAX_AUTO_KV_TOKENS)
    return max_batch_total_tokens // block_size + 1  # + the null block


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, sampler: Sampler | None = None):
        self.model, self.block_size, self.device = model, block_size, device
        self._sampler = sampler
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            # zeros, not empty: attention reads whole blocks and masks the slots past a sequence's
            # end, but a masked NaN left in reused memory still poisons the sum (0 * NaN = NaN).
            # Committing the memory now also makes a too-large cache fail at start-up, not mid-run.
            layer.bind_cache(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks - 1, block_size,
                 num_blocks * block_size * kv_bytes_per_token(model, dtype) / 2**30)

    @property
    def sampler(self) -> Sampler:
        if self._sampler is None:  # no sampler given: a plain one over the model's vocabulary
            self._sampler = Sampler(self.model.lm_head.vocab_size, self.device)
        return self._sampler

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> SampledTokens:
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        inputs = build_inputs(plan, self.block_size, self.device)
        seqs = plan.sample_seqs
        prepared = self.sampler.prepare(seqs) if seqs else None  # grammar masks start computing now
        if inputs.cross is not None:  # an encoder-decoder: encode the new requests, then decode
            if inputs.cross.encode is not None:
                self.model.encode(inputs.cross.encode)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, inputs.cross)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn)  # [tokens, hidden]
        prompt_logprobs = self._prompt_logprobs(plan, inputs, hidden)
        if prepared is None:
            return SampledTokens([], [], prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_indices)).float()
        sampled = self.sampler.sample(logits, prepared)
        return dataclasses.replace(sampled, prompt_logprobs=prompt_logprobs) if prompt_logprobs else sampled

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

    def _prompt_logprobs(self, plan: StepPlan, inputs: BatchInputs, hidden: torch.Tensor) -> dict[int, list[float]]:
        """log_softmax of the raw logits at each prompt position computed this step, taken at the
        next prompt token: what TGI reports as `details.prefill`. Positions already reported (a
        recomputed prefill) are skipped."""
        rows: list[np.ndarray] = []
        targets: list[int] = []
        owners: list[tuple[int, int]] = []
        for index, item in enumerate(plan.scheduled):
            seq = item.seq
            if not seq.sampling.prompt_logprobs:
                continue
            computed = seq.num_computed_tokens
            # the hidden state at position p predicts the token at p + 1
            first = max(computed, seq.num_prompt_logprobs - 1)
            last = min(computed + item.num_tokens, seq.num_prompt_tokens - 1)
            if first >= last:
                continue
            start = inputs.starts[index] - computed
            rows.append(np.arange(start + first, start + last))
            targets.extend(seq.token_ids[first + 1:last + 1])
            owners.append((index, last - first))
        if not rows:
            return {}
        flat = torch.from_numpy(np.concatenate(rows)).to(self.device)
        wanted = torch.tensor(targets, dtype=torch.long, device=self.device)
        pieces = []
        for at in range(0, len(flat), PROMPT_LOGITS_ROWS):
            piece = flat[at:at + PROMPT_LOGITS_ROWS]
            logits = self.model.compute_logits(hidden.index_select(0, piece)).float()
            pieces.append(logits.log_softmax(dim=-1).gather(1, wanted[at:at + PROMPT_LOGITS_ROWS, None]).squeeze(1))
        values = torch.cat(pieces).tolist()
        out, at = {}, 0
        for index, count in owners:
            out[index] = values[at:at + count]
            at += count
        return out

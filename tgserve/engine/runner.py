"""Runs one StepPlan: flat inputs → model forward → logits of the sampling rows → sampled tokens.

Owns the KV-cache tensors (bound once to the model's attention layers) and their sizing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tgserve.engine.inputs import build_inputs
from tgserve.engine.scheduler import StepPlan
from tgserve.sampling.sampler import SampledTokens, sample
from tgserve.sampling.tensors import SamplingTensors

log = logging.getLogger(__name__)

MAX_AUTO_KV_TOKENS = 1 << 20


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    layers = model.attention_layers()
    first = layers[0]
    return len(layers) * 2 * first.num_kv_heads * first.head_dim * torch.finfo(dtype).bits // 8


def plan_num_blocks(model: nn.Module, dtype: torch.dtype, block_size: int, max_batch_total_tokens: int | None,
                    available_bytes: int, memory_fraction: float) -> int:
    """Blocks for the requested token capacity, or for what fits in a fraction of free memory."""
    if max_batch_total_tokens is None:
        tokens = int(available_bytes * memory_fraction) // kv_bytes_per_token(model, dtype)
        max_batch_total_tokens = min(tokens, MAX_AUTO_KV_TOKENS)
    return max_batch_total_tokens // block_size + 1  # + the null block


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.model, self.block_size, self.device = model, block_size, device
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            # zeros, not empty: attention reads whole blocks and masks the slots past a sequence's
            # end, but a masked NaN left in reused memory still poisons the sum (0 * NaN = NaN).
            # Committing the memory now also makes a too-large cache fail at start-up, not mid-run.
            layer.bind_cache(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks - 1, block_size,
                 num_blocks * block_size * kv_bytes_per_token(model, dtype) / 2**30)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> SampledTokens:
        inputs = build_inputs(plan, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn)  # [tokens, hidden]
        rows = plan.sampling
        if not rows:
            return SampledTokens([], [])
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_indices)).float()
        tensors = SamplingTensors.build([r.seq.sampling for r in rows], [r.seq.num_tokens for r in rows], self.device)
        return sample(logits, tensors)

"""The transformers fallback: any architecture transformers loads as a causal LM, served with
continuous batching the seed's way.

The running batch is one transformers cache, left-padded: a request whose prompt completes this
step is prefilled alone (its whole prompt; the scheduler's chunks are only waited through), its
cache is padded and appended to the batch's; sequences that end (or are preempted) are filtered
out of it; every decode step runs the batch's next tokens through the model once. The scheduler
and the sampler are the native engine's, so every parameter and the API behave the same; KV blocks
are only accounted (transformers holds the tensors).
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch

from tgserve.engine.scheduler import StepPlan
from tgserve.params import SamplingParams
from tgserve.sampling.sampler import SampledTokens, Sampler

log = logging.getLogger(__name__)


def supports(hf_config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(hf_config) in MODEL_FOR_CAUSAL_LM_MAPPING


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """For sizing the (accounted) KV cache like a native model's."""
    heads = getattr(hf_config, "num_attention_heads", 1) or 1
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    layers = getattr(hf_config, "num_hidden_layers", 1)
    return layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class FallbackRunner:
    def __init__(self, folder: str, dtype: torch.dtype, device: torch.device, sampler: Sampler):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        # transformers 5 names the cache argument `cache` (older model classes: `past_key_values`)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device, self.sampler = device, sampler
        self.rows: list[str] = []  # request id of each batch row
        self.cache = None  # transformers' cache of the running batch, left-padded
        self.mask: torch.Tensor | None = None  # [rows, length] 1 = a real token

    def admit(self, request_id: str, sampling: SamplingParams, generated: list[int]) -> None:
        self.sampler.begin(request_id, sampling, generated)

    def release(self, request_ids: list[str]) -> None:
        if request_ids:
            self.sampler.release(request_ids)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> SampledTokens:
        decoding = {s.seq.request_id: s.seq for s in plan.scheduled if s.num_tokens == 1 and s.seq.request_id in self.rows}
        self._keep([r for r in self.rows if r in decoding])  # ended, aborted or preempted rows leave
        logits: dict[str, torch.Tensor] = {}
        prompt_logprobs: dict[int, list[float]] = {}
        if self.rows:
            logits.update(self._decode([decoding[r] for r in self.rows]))
        for index, item in enumerate(plan.scheduled):
            seq = item.seq
            if not item.samples or seq.request_id in decoding:
                continue  # a chunk before its prompt's last: the whole prompt runs with the last
            tokens = seq.token_ids[:seq.num_computed_tokens + item.num_tokens]
            last, cache, all_logits = self._prefill(tokens)
            logits[seq.request_id] = last
            self._append([seq.request_id, *(f.request_id for f in item.forks)], cache, len(tokens))
            for fork in item.forks:
                logits[fork.request_id] = last
            if seq.sampling.prompt_logprobs:
                prompt_logprobs[index] = self._prompt_logprobs(seq, all_logits)
        seqs = plan.sample_seqs
        if not seqs:
            return SampledTokens([], [], prompt_logprobs=prompt_logprobs)
        prepared = self.sampler.prepare(seqs)
        batch = torch.stack([logits[s.request_id] for s in seqs]).float()
        sampled = self.sampler.sample(batch, prepared)
        if prompt_logprobs:
            from dataclasses import replace

            sampled = replace(sampled, prompt_logprobs=prompt_logprobs)
        return sampled

    def _prefill(self, tokens: list[int]):
        ids = torch.tensor([tokens], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        return out.logits[0, -1], _cache_of(out), out.logits[0]

    def _prompt_logprobs(self, seq, all_logits: torch.Tensor) -> list[float]:
        first = seq.num_prompt_logprobs - 1
        end = seq.num_prompt_tokens - 1
        targets = torch.tensor(seq.token_ids[first + 1:end + 1], device=self.device)
        return all_logits[first:end].float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1).tolist()

    def _decode(self, seqs) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[s.token_ids[s.num_computed_tokens]] for s in seqs], device=self.device)
        positions = self.mask.sum(dim=-1, keepdim=True)  # each row's next position: its real tokens
        self.mask = torch.cat([self.mask, torch.ones(len(seqs), 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: self.cache})
        self.cache = _cache_of(out)
        return {s.request_id: out.logits[i, -1] for i, s in enumerate(seqs)}

    # ---- the batch's cache: append (left-padding to a common length) and filter ------------------

    def _layers(self, cache):
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            raise NotImplementedError(f"the transformers fallback batches plain dynamic caches only, not "
                                      f"{[type(layer).__name__ for layer in layers or []]}")
        return layers

    def _append(self, request_ids: list[str], cache, length: int) -> None:
        n = len(request_ids)
        if self.cache is None:
            for layer in self._layers(cache):
                layer.keys, layer.values = layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1)
            self.cache, self.rows = cache, list(request_ids)
            self.mask = torch.ones(n, length, dtype=torch.long, device=self.device)
            return
        width = max(self.mask.shape[1], length)
        for old, new in zip(self._layers(self.cache), self._layers(cache)):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width).repeat(n, 1, 1, 1)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width).repeat(n, 1, 1, 1)])
        new_mask = torch.ones(n, length, dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(new_mask, width, dim=1)])
        self.rows += request_ids

    def _keep(self, kept: list[str]) -> None:
        if kept == self.rows:
            return
        if not kept:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor([self.rows.index(r) for r in kept], device=self.device)
        mask = self.mask.index_select(0, index)
        start = int(np.argmax(mask.any(dim=0).cpu().numpy()))  # columns every kept row pads: dropped
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask, self.rows = mask[:, start:], kept


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

"""The transformers fallback: any architecture transformers loads as a causal or seq2seq LM,
served with continuous batching the seed's way.

The running batch is one transformers cache, left-padded: a request whose prompt completes this
step is prefilled alone (its whole prompt; the scheduler's chunks are only waited through), its
cache is padded and appended to the batch's; sequences that end (or are preempted) are filtered
out of it; every decode step runs the batch's next tokens through the model once. The scheduler
and the sampler are the native engine's, so every parameter and the API behave the same; KV blocks
are only accounted (transformers holds the tensors).

An encoder-decoder (seq2seq) model has two time axes, each left-padded with its own mask: the
decoder's (self-attention cache) and the encoder's (its outputs and the cross-attention cache,
written once by the prefill that admits the request: encoder + first decoder step). Decode steps
pass both masks. Cross-attention has no positions, so padding it is free; the decoder's padding is
made invisible by giving each row its own position (below).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from tgserve.engine.scheduler import StepPlan
from tgserve.params import SamplingParams
from tgserve.sampling.sampler import SampledTokens, Sampler

log = logging.getLogger(__name__)


def supports(hf_config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    if type(hf_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return True
    # the seq2seq table also names audio LMs that are decoders with an audio tower: not text-to-text
    return type(hf_config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING and _is_seq2seq(hf_config)


def _is_seq2seq(hf_config) -> bool:
    return bool(getattr(hf_config, "is_encoder_decoder", False))


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """For sizing the (accounted) KV cache like a native model's."""
    heads = getattr(hf_config, "num_attention_heads", 1) or 1
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    layers = getattr(hf_config, "num_hidden_layers", 1)
    return layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class FallbackRunner:
    def __init__(self, folder: str, dtype: torch.dtype, device: torch.device, sampler: Sampler):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        self.seq2seq = _is_seq2seq(AutoConfig.from_pretrained(folder))
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = auto.from_pretrained(folder, dtype=dtype).to(device).eval()
        parameters = inspect.signature(self.model.forward).parameters
        # transformers 5 names the cache argument `cache` (older model classes: `past_key_values`)
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.device, self.sampler = device, sampler
        self.rows: list[str] = []  # request id of each batch row
        self.cache = None  # transformers' cache of the running batch, left-padded
        self.mask: torch.Tensor | None = None  # [rows, length] 1 = a real (decoder) token
        self.encoder_mask: torch.Tensor | None = None  # [rows, encoder length] 1 = a real prompt token
        self.encoder_states: torch.Tensor | None = None  # [rows, encoder length, hidden]
        self.decoder_start_token_id = _decoder_start(self.model) if self.seq2seq else None  # for the scheduler
        # a decoder that takes no positions: each row's own, through its position module (None: relative ones)
        self.takes_positions = "decoder_position_ids" in parameters
        self.decoder_positions = _DecoderPositions.of(self.model, self.decoder_start_token_id) \
            if self.seq2seq and not self.takes_positions else None

    def admit(self, request_id: str, sampling: SamplingParams, generated: list[int]) -> None:
        self.sampler.begin(request_id, sampling, generated)

    def keep_alive(self) -> None:
        """Never sharded: nobody to tell."""

    @torch.inference_mode()
    def release(self, request_ids: list[str]) -> None:
        if request_ids:
            self.sampler.release(request_ids)
            ended = set(request_ids)  # their rows leave now, not at the next step (an idle batch holds nothing)
            self._keep([r for r in self.rows if r not in ended])

    @torch.inference_mode()
    def execute(self, plan: StepPlan, profile=None) -> SampledTokens:
        """One step of the transformers model (its time is the step profile's "forward")."""
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
            last, cache, all_logits, encoded = self._prefill(seq.encoder_ids, tokens)
            logits[seq.request_id] = last
            self._append([seq.request_id, *(f.request_id for f in item.forks)], cache, len(tokens), encoded)
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

    def _prefill(self, encoder_ids: list[int] | None, tokens: list[int]):
        """One request alone: (last logits, its cache, all logits, its encoder outputs or None)."""
        ids = torch.tensor([tokens], device=self.device)
        if not self.seq2seq:
            out = self.model(input_ids=ids, use_cache=True)
            return out.logits[0, -1], _cache_of(out), out.logits[0], None
        prompt = torch.tensor([encoder_ids], device=self.device)
        out = self.model(input_ids=prompt, decoder_input_ids=ids, use_cache=True)
        return out.logits[0, -1], _cache_of(out), out.logits[0], out.encoder_last_hidden_state

    def _prompt_logprobs(self, seq, all_logits: torch.Tensor) -> list[float]:
        first = seq.num_prompt_logprobs - 1
        end = seq.num_prompt_tokens - 1
        targets = torch.tensor(seq.token_ids[first + 1:end + 1], device=self.device)
        return all_logits[first:end].float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1).tolist()

    def _decode(self, seqs) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[s.token_ids[s.num_computed_tokens]] for s in seqs], device=self.device)
        positions = self.mask.sum(dim=-1, keepdim=True)  # each row's next position: its real tokens
        self.mask = torch.cat([self.mask, torch.ones(len(seqs), 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        if self.seq2seq:
            out = self._decode_seq2seq(ids, positions)
        else:
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             **{self.cache_arg: self.cache})
        self.cache = _cache_of(out)
        return {s.request_id: out.logits[i, -1] for i, s in enumerate(seqs)}

    def _decode_seq2seq(self, ids: torch.Tensor, positions: torch.Tensor):
        """The decoder's step over the batch: its mask, the encoder's outputs and mask, each row's position."""
        from transformers.modeling_outputs import BaseModelOutput

        inputs = dict(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
                      attention_mask=self.encoder_mask, decoder_input_ids=ids, decoder_attention_mask=self.mask,
                      use_cache=True, **{self.cache_arg: self.cache})
        if self.takes_positions:
            inputs["decoder_position_ids"] = positions
        with self.decoder_positions.override(positions[:, 0]) if self.decoder_positions else nullcontext():
            return self.model(**inputs)

    # ---- the batch's cache: append (left-padding to a common length) and filter ------------------

    def _layers(self, cache, cross: bool = False):
        from transformers.cache_utils import DynamicLayer

        if self.seq2seq:
            cache = cache.cross_attention_cache if cross else cache.self_attention_cache
        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            raise NotImplementedError(f"the transformers fallback batches plain dynamic caches only, not "
                                      f"{[type(layer).__name__ for layer in layers or []]}")
        return layers

    def _append(self, request_ids: list[str], cache, length: int, encoded: torch.Tensor | None) -> None:
        """Join one prefilled request as n rows (its forks share its prefill): along each time axis,
        the batch and the newcomer are left-padded to the longer of the two."""
        n, rows = len(request_ids), len(self.rows)
        if self.cache is None:  # the first request's cache object becomes the batch's, with no rows yet
            self.cache = cache
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            if self.seq2seq:
                self.encoder_mask, self.encoder_states = self.mask, encoded[:0]
        # `old` may be `new` (a first request): [:rows] takes the batch's rows (none) before joining
        width = max(self.mask.shape[1], length)
        for old, new in zip(self._layers(self.cache), self._layers(cache)):
            old.keys = _join(old.keys[:rows], new.keys, width, n, dim=2)
            old.values = _join(old.values[:rows], new.values, width, n, dim=2)
        self.mask = _join(self.mask, _ones(length, self.device), width, n, dim=1)
        if self.seq2seq:
            width = max(self.encoder_mask.shape[1], encoded.shape[1])
            for old, new in zip(self._layers(self.cache, cross=True), self._layers(cache, cross=True)):
                old.keys = _join(old.keys[:rows], new.keys, width, n, dim=2)
                old.values = _join(old.values[:rows], new.values, width, n, dim=2)
            self.encoder_states = _join(self.encoder_states, encoded, width, n, dim=1)
            self.encoder_mask = _join(self.encoder_mask, _ones(encoded.shape[1], self.device), width, n, dim=1)
        self.rows += request_ids

    def _keep(self, kept: list[str]) -> None:
        if kept == self.rows:
            return
        if not kept:
            self.rows, self.cache, self.mask, self.encoder_mask, self.encoder_states = [], None, None, None, None
            return
        index = torch.tensor([self.rows.index(r) for r in kept], device=self.device)
        self.mask, _ = _select(self._layers(self.cache), self.mask, index)
        if self.seq2seq:
            self.encoder_mask, start = _select(self._layers(self.cache, cross=True), self.encoder_mask, index)
            self.encoder_states = self.encoder_states.index_select(0, index)[:, start:]
        self.rows = kept


class _DecoderPositions:
    """Each row's own position for a decoder that takes none from outside (BART's family: its
    `embed_positions` module embeds cache length + i, the same for every row of a left-padded
    batch). While a batched decode runs, the module's output is replaced by the embedding of each
    row's real length, looked up in a table of the module's own outputs at positions 0..n-1 (one
    forward pass of n decoder tokens fills it, and again, longer, when a row outgrows it). Decoders
    without such a module must be position-free under left padding (T5's relative attention bias
    is: it sees distances only)."""

    def __init__(self, model, module, token: int, limit: int | None):
        self.model, self.token, self.limit = model, token, limit
        self.table: torch.Tensor | None = None  # [n, hidden] the module's output at positions 0..n-1
        self.rows: torch.Tensor | None = None  # [rows] each row's position, while a decode runs
        self.captured: torch.Tensor | None = None
        module.register_forward_hook(self._hook)

    @classmethod
    def of(cls, model, start: int):
        decoder = model.get_decoder()
        module = getattr(decoder, "embed_positions", None)
        if module is None:
            if any(name.endswith("relative_attention_bias") for name, _ in decoder.named_modules()):
                return None  # relative positions: left padding leaves every distance as it is
            raise NotImplementedError(f"the transformers fallback cannot give each row of a batched "
                                      f"{type(model).__name__} its own decoder position")
        config = model.config
        limit = next((v for v in (getattr(config, k, None) for k in ("max_decoder_position_embeddings",
                     "max_target_positions", "max_position_embeddings")) if v), None)
        pad = getattr(config, "pad_token_id", None)  # M2M100's family gives pad tokens no position: avoid it
        return cls(model, module, start if start != pad else (pad + 1) % config.vocab_size, limit)

    @contextmanager
    def override(self, rows: torch.Tensor):
        """While it lasts, the decoder embeds position rows[i] for row i ([rows], one token each)."""
        self._cover(int(rows.max()) + 1)
        self.rows = rows
        try:
            yield
        finally:
            self.rows = None

    def _hook(self, module, args, output):
        if self.rows is not None:
            return self.table[self.rows][:, None]  # [rows, 1, hidden]
        self.captured = output
        return None

    def _cover(self, n: int) -> None:
        if self.table is not None and len(self.table) >= n:
            return
        size = max(64, 1 << (n - 1).bit_length())
        size = min(size, self.limit) if self.limit else size
        ids = torch.full((1, size), self.token, device=self.model.device)
        self.model(input_ids=ids[:, :1], decoder_input_ids=ids, use_cache=False)  # the decoder's call comes last
        self.table = self.captured.reshape(-1, self.captured.shape[-1])[-size:]


def _decoder_start(model) -> int:
    """generate's rule: the generation config's decoder start, else BOS; the pad token at last."""
    generation, config = model.generation_config, model.config
    for token in (generation.decoder_start_token_id, config.decoder_start_token_id, generation.bos_token_id,
                  config.pad_token_id):
        if token is not None:
            return int(token)
    raise ValueError("the model names no decoder start token (nor BOS, nor pad)")


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _ones(length: int, device) -> torch.Tensor:
    return torch.ones(1, length, dtype=torch.long, device=device)


def _join(old: torch.Tensor, new: torch.Tensor, width: int, n: int, dim: int) -> torch.Tensor:
    """old's rows, then n copies of new's one row, both left-padded to `width` along `dim`."""
    new = _left_pad(new, width, dim)
    return torch.cat([_left_pad(old, width, dim), new.expand(n, *new.shape[1:])])


def _select(layers, mask: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keep the rows `index` of one time axis's cache layers ([rows, heads, time, dim]) and mask,
    dropping the columns every kept row pads: (the new mask, how many columns were dropped)."""
    mask = mask.index_select(0, index)
    start = int(np.argmax(mask.any(dim=0).cpu().numpy()))
    for layer in layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:], start


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

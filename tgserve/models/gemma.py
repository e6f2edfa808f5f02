"""Gemma 2 and Gemma 3 (text) — what differs from Llama (models/llama.py).

Gemma's RMSNorm (weight stored as an offset from 1, applied in float32), four of them per layer
(after attention and around the MLP too); embeddings scaled by sqrt(hidden) (the factor rounded
to the model dtype, as transformers does); a gelu-tanh gated MLP; attention scaled by
query_pre_attn_scalar**-0.5; sliding-window and full layers alternating as config.layer_types
says; soft-capping of attention scores and of the final logits where the config sets it (Gemma 2);
tied LM head. Gemma 3 adds a Gemma RMSNorm on each head of q and k, and its rotary frequencies
differ per layer type (local base for sliding layers, global base and scaling for full ones).
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import ActAndMul
from tgserve.layers.attention import AttentionInputs
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from tgserve.layers.norm import GemmaRMSNorm
from tgserve.layers.position import RotaryEmbedding, rope_frequencies
from tgserve.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of, sliding_windows


class GemmaMLP(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, dtype)
        self.act = ActAndMul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, rotary: RotaryEmbedding, window: int | None, flags: type):
        super().__init__()
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = LlamaAttention(cfg, dtype, rotary, window, flags)
        self.mlp = GemmaMLP(cfg, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, attn))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int, flags: type):
        super().__init__()
        if getattr(cfg, "use_bidirectional_attention", False):
            raise NotImplementedError("Gemma with bidirectional attention (an embedding model) is not supported")
        layer_types = cfg.layer_types
        rotaries = {}
        for kind in sorted(set(layer_types)):  # one table per layer type (Gemma 2: the same frequencies)
            inv_freq, scaling = rope_frequencies(cfg, head_dim_of(cfg), kind if flags.rope_per_layer_type else None)
            positions = min(cfg.max_position_embeddings, max_model_len)
            rotaries[kind] = RotaryEmbedding(inv_freq, scaling, positions, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        # sqrt(hidden) as a float32 tensor cast to the model dtype: what transformers multiplies by
        self.register_buffer("normalizer", torch.tensor(cfg.hidden_size**0.5).to(dtype), persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, dtype, rotaries[kind], window, flags)
                                    for kind, window in zip(layer_types, sliding_windows(cfg)))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.normalizer  # [tokens, hidden]
        for layer in self.layers:
            x = layer(x, positions, attn)
        return x


class Gemma2ForCausalLM(LlamaForCausalLM):
    qk_norm = False  # a Gemma RMSNorm over each head of q and k, before the rotation (Gemma 3)
    rope_per_layer_type = False  # rope_parameters keyed by layer type (Gemma 3)
    norm = GemmaRMSNorm

    @staticmethod
    def attention_scale(cfg) -> float:
        return cfg.query_pre_attn_scalar**-0.5

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        nn.Module.__init__(self)  # Llama's packing, loading and forward; Gemma's own model
        self.model = GemmaModel(cfg, dtype, max_model_len, type(self))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie(self.model.embed_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample, soft-capped: [rows, vocab]."""
        logits = self.lm_head(self.model.norm(hidden))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    rope_per_layer_type = True

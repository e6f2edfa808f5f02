"""Llama-family decoders: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, Phi-3, SmolLM — only what is
unique to them.

Pre-norm blocks of rotary self-attention (grouped KV heads) and a SiLU-gated MLP, built from the
shared tensor-parallel layers. Checkpoint q/k/v and gate/up projections fold into fused parameters.
The family members differ by a few flags, set as class attributes of their subclasses: biases on
q/k/v (Qwen2), RMSNorm on each head of q and k (Qwen3), checkpoints that already fuse q/k/v and
gate/up (Phi-3); the attention layer also serves Gemma (its norm, scale and soft-capping). Sliding windows come from the config: `layer_types` names each layer's attention
(Qwen2/3), else `sliding_window` applies to every layer (Mistral, Phi-3).
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import SiluAndMul
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.decode_stack import DecodeStack
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tgserve.layers.norm import RMSNorm
from tgserve.layers.position import RotaryEmbedding, rope_frequencies


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_windows(cfg) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:
        return [window] * cfg.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


class LlamaAttention(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, rotary: RotaryEmbedding, window: int | None, flags: type):
        super().__init__()
        head_dim = head_dim_of(cfg)
        qkv_bias = flags.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        o_bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, qkv_bias, dtype
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size, o_bias, dtype,
                                        split=self.qkv_proj.out_split)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.rotary = rotary
        if flags.qk_norm:
            self.q_norm = flags.norm(head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = flags.norm(head_dim, cfg.rms_norm_eps, dtype)
        self.qk_norm = flags.qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim, flags.attention_scale(cfg),
                                   sliding_window=window, logit_softcap=getattr(cfg, "attn_logit_softcapping", None))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), attn)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r} is not supported for Llama-family models")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias, dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias, dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.gate_up_proj.forward_silu_mul(x)  # one native pass where there is one
        if act is None:
            act = self.act(self.gate_up_proj(x))
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, rotary: RotaryEmbedding, window: int | None, flags: type):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, rotary, window, flags)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`pending`: the previous layer's MLP output, not yet added to x (the add is fused with
        this layer's first norm). Returns (x, this layer's MLP output, not yet added)."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm.add_forward(x, pending)
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(h, positions, attn))
        return x, self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, flags: type):
        super().__init__()
        head_dim = head_dim_of(cfg)
        factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor") or 1.0
        inv_freq, scaling = rope_frequencies(cfg, int(head_dim * factor))
        rotary = RotaryEmbedding(inv_freq, scaling, cfg.max_position_embeddings, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, rotary, window, flags)
                                    for window in sliding_windows(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self._stack: DecodeStack | None = None  # the layers in one native call (decode steps; after loading)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        if self._stack is None:
            self._stack = DecodeStack(list(self.layers))
        if (stacked := self._stack.run(x, positions, attn)) is not None:
            return stacked  # the same computation, bit for bit (layers/decode_stack.py)
        pending = None
        for layer in self.layers:
            x, pending = layer(x, positions, attn, pending)
        return x + pending


class LlamaForCausalLM(nn.Module):
    # checkpoint module name → (our fused module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    ignored_checkpoint_suffixes = ("rotary_emb.inv_freq",)
    qkv_bias = False  # q/k/v carry a bias even where the config says nothing of it
    qk_norm = False  # an RMSNorm over each head of q and k, before the rotation
    norm = RMSNorm  # the family's RMSNorm (Gemma's applies 1 + weight)

    @staticmethod
    def attention_scale(cfg) -> float:
        return head_dim_of(cfg) ** -0.5

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        self.model = LlamaModel(cfg, dtype, type(self))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie(self.model.embed_tokens)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample: [rows, vocab]."""
        return self.lm_head(self.model.norm(hidden))


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules: dict = {}  # its checkpoints name qkv_proj and gate_up_proj already fused

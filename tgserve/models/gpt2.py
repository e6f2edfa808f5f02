"""GPT-2: only what is unique to it.

Pre-norm (LayerNorm) blocks over learned absolute positions, a gelu_new MLP and a final ln_f; the
LM head is tied to the token embedding unless the config says otherwise. The checkpoint's Conv1D
weights are stored [in, out] and turned into our [out, in] on loading; `c_attn` already holds
[q | k | v] on its output dimension, so it loads into the fused QKV projection as one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import activation
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tgserve.layers.norm import LayerNorm
from tgserve.layers.position import LearnedPositions


def _check_supported(cfg) -> None:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, flag, False):
            raise NotImplementedError(f"GPT-2 with {flag}=True is not supported")


class GPT2Attention(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // heads
        self.c_attn = QKVParallelLinear(cfg.hidden_size, self.head_dim, heads, heads, True, dtype)
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, True, dtype, split=self.c_attn.out_split)
        self.num_heads = self.c_attn.num_heads
        scale = self.head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(self.attn(q, k, v, attn))


class GPT2MLP(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        inner = getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, inner, True, dtype)
        self.c_proj = RowParallelLinear(inner, cfg.hidden_size, True, dtype)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.attn = GPT2Attention(cfg, dtype)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.mlp = GPT2MLP(cfg, dtype)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.wpe = LearnedPositions(cfg.max_position_embeddings, cfg.hidden_size, dtype)
        self.h = nn.ModuleList(GPT2Block(cfg, dtype) for _ in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # [tokens, hidden]
        for block in self.h:
            x = block(x, attn)
        return x


class GPT2LMHeadModel(nn.Module):
    # causal-mask buffers that old checkpoints saved beside the weights
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        _check_supported(cfg)
        self.transformer = GPT2Model(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie(self.transformer.wte)

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # openai-community/gpt2 saved the bare GPT2Model
        if tensor.dim() == 2 and (".attn.c_" in name or ".mlp.c_" in name):
            tensor = tensor.t()  # Conv1D: [in, out] → [out, in]
        return [(name, tensor)]

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample: [rows, vocab]."""
        return self.lm_head(self.transformer.ln_f(hidden))

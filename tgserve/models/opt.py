"""OPT and Galactica (OPT checkpoints with other config values): only what is unique to them.

Learned absolute positions with OPT's offset of 2, LayerNorm blocks either pre-norm
(`do_layer_norm_before`, OPT-125m and most sizes) or post-norm (OPT-350m), an MLP of
`activation_function` (relu for OPT, gelu for Galactica). Token embeddings may be narrower than
the hidden size (`word_embed_proj_dim`: projected in after the lookup and out before the head).
Queries are scaled before attention, as OPT does. The head is tied unless the config says not.
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import activation
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from tgserve.layers.norm import LayerNorm
from tgserve.layers.position import LearnedPositions

POSITION_OFFSET = 2  # OPT's position rows 0 and 1 are never used


def layer_norm(cfg, dtype: torch.dtype) -> nn.Module:
    if getattr(cfg, "layer_norm_elementwise_affine", True):
        return LayerNorm(cfg.hidden_size, 1e-5, dtype)
    return nn.LayerNorm(cfg.hidden_size, elementwise_affine=False)  # nothing to load


class OPTAttention(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        heads, bias = cfg.num_attention_heads, cfg.enable_bias
        self.head_dim = cfg.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, heads, heads, bias, dtype)
        self.out_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias, dtype, split=self.qkv_proj.out_split)
        self.num_heads = self.qkv_proj.num_heads
        self.scale = self.head_dim**-0.5
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, 1.0)  # q comes scaled

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, dim=-1))
        return self.out_proj(self.attn(q * self.scale, k, v, attn))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, dtype)
        self.self_attn_layer_norm = layer_norm(cfg, dtype)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_dim, cfg.enable_bias, dtype)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.hidden_size, cfg.enable_bias, dtype)
        self.act = activation(cfg.activation_function)
        self.final_layer_norm = layer_norm(cfg, dtype)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x) if self.pre_norm else x, attn)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x) if self.pre_norm else x)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        hidden, proj = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj, dtype)
        self.embed_positions = LearnedPositions(cfg.max_position_embeddings, hidden, dtype, POSITION_OFFSET)
        self.project_in = ReplicatedLinear(proj, hidden, False, dtype) if proj != hidden else None
        self.project_out = ReplicatedLinear(hidden, proj, False, dtype) if proj != hidden else None
        final = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        self.final_layer_norm = layer_norm(cfg, dtype) if final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, word_embed_proj_dim]
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions)  # [tokens, hidden]
        for layer in self.layers:
            x = layer(x, attn)
        return x

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)


class OPTModel(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.decoder = OPTDecoder(cfg, dtype)


class OPTForCausalLM(nn.Module):
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        self.model = OPTModel(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.word_embed_proj_dim, dtype)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie(self.model.decoder.embed_tokens)

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.startswith("decoder."):
            name = "model." + name  # facebook/opt-* checkpoints saved the bare OPTModel
        return [(name, tensor)]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample: [rows, vocab]."""
        return self.lm_head(self.model.decoder.head_input(hidden))

"""BLOOM / BLOOMZ — what differs from Llama (models/llama.py).

No rotary: ALiBi biases attention by key position (an attention option). LayerNorm everywhere,
including one right after the token embedding; biases on every linear; a 4×-wide MLP with BLOOM's
own gelu. The checkpoint fuses q/k/v per head ([heads, 3, head_dim] along the output rows), which
`checkpoint_transform` reorders into the [q | k | v] a QKVParallelLinear shards by heads. Hub
checkpoints name their tensors with or without the "transformer." prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import activation
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tgserve.layers.norm import LayerNorm
from tgserve.layers.position import alibi_slopes


class BloomAttention(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        heads, self.head_dim = cfg.n_head, cfg.hidden_size // cfg.n_head
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, self.head_dim, heads, heads, True, dtype)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, True, dtype,
                                       split=self.query_key_value.out_split)
        self.num_heads = self.query_key_value.num_heads  # this rank's
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5,
                                   alibi_slopes=alibi_slopes(heads))

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.query_key_value(x).chunk(3, dim=-1))
        return self.dense(self.attn(q, k, v, attn))


class BloomMLP(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, 4 * cfg.hidden_size, True, dtype)
        self.dense_4h_to_h = RowParallelLinear(4 * cfg.hidden_size, cfg.hidden_size, True, dtype)
        self.act = activation("bloom_gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.self_attention = BloomAttention(cfg, dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.mlp = BloomMLP(cfg, dtype)
        # the residual is the normalised input, not the input (no released BLOOM does this)
        self.residual_post_norm = bool(cfg.apply_residual_connection_post_layernorm)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.residual_post_norm else x) + self.self_attention(h, attn)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_post_norm else x) + self.mlp(h)


class BloomModel(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)
        self.h = nn.ModuleList(BloomBlock(cfg, dtype) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype)

    def forward(self, input_ids: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [tokens, hidden]
        for block in self.h:
            x = block(x, attn)
        return x


class BloomForCausalLM(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.n_head, cfg.hidden_size // cfg.n_head
        self.transformer = BloomModel(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie(self.transformer.word_embeddings)

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Add the "transformer." prefix where the checkpoint has none; q/k/v per head → [q | k | v]."""
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if ".query_key_value." in name:  # rows [heads, 3, head_dim] → [3, heads, head_dim]
            rows = tensor.view(self.num_heads, 3, self.head_dim, *tensor.shape[1:])
            tensor = rows.transpose(0, 1).reshape(tensor.shape)
        return [(name, tensor)]

    def attention_layers(self) -> list[PagedAttention]:
        return [block.self_attention.attn for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.transformer(input_ids, attn)  # positions enter through ALiBi's key positions

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample: [rows, vocab]."""
        return self.lm_head(self.transformer.ln_f(hidden))

"""GPT-NeoX (Pythia, GPT-NeoX-20B): only what is unique to it.

LayerNorm blocks of rotary self-attention (only the first `partial_rotary_factor` of each head
rotates) and a dense MLP, the two either in parallel off the same input (`use_parallel_residual`,
the default) or one after the other. The checkpoint's fused `query_key_value` is laid out per head
as [heads, 3, head_dim]; it is reordered into our [q | k | v] on loading. The head (`embed_out`)
has its own weights unless the config ties it.
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.activation import activation
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tgserve.layers.norm import LayerNorm
from tgserve.layers.position import RotaryEmbedding, rope_frequencies


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        heads, bias = cfg.num_attention_heads, cfg.attention_bias
        self.head_dim = cfg.hidden_size // heads
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, self.head_dim, heads, heads, bias, dtype)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias, dtype,
                                       split=self.query_key_value.out_split)
        self.num_heads = self.query_key_value.num_heads
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.query_key_value(x).chunk(3, dim=-1))
        q, k = self.rotary(positions, q, k)
        return self.dense(self.attn(q, k, v, attn))


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True, dtype)
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True, dtype)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.attention = GPTNeoXAttention(cfg, dtype, rotary)
        self.mlp = GPTNeoXMLP(cfg, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        a = self.attention(self.input_layernorm(x), positions, attn)
        if self.parallel:  # summed in the reference's order: (mlp + attention) + residual
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        a = a + x
        return self.mlp(self.post_attention_layernorm(a)) + a


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        inv_freq, scaling = rope_frequencies(cfg, int(head_dim * factor))
        rotary = RotaryEmbedding(inv_freq, scaling, cfg.max_position_embeddings, dtype)
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, dtype, rotary) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.embed_in(input_ids)  # [tokens, hidden]
        for layer in self.layers:
            x = layer(x, positions, attn)
        return x


class GPTNeoXForCausalLM(nn.Module):
    # buffers (causal mask, rotary frequencies) that older checkpoints saved beside the weights
    ignored_checkpoint_suffixes = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        self.gpt_neox = GPTNeoXModel(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.num_heads = cfg.num_attention_heads
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie(self.gpt_neox.embed_in)

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.startswith("embed_out."):
            name = "lm_head." + name[len("embed_out."):]
        if ".query_key_value." in name:  # [heads, 3, head_dim, ...] → [3, heads, head_dim, ...]
            rest = tensor.shape[1:]
            tensor = tensor.view(self.num_heads, 3, -1, *rest).transpose(0, 1).reshape(tensor.shape)
        return [(name, tensor)]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.attention.attn for layer in self.gpt_neox.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the full vocabulary for the rows that sample: [rows, vocab]."""
        return self.lm_head(self.gpt_neox.final_layer_norm(hidden))

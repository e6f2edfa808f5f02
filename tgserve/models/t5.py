"""T5 / mT5 / MT0 (encoder-decoder): only what is unique to them.

The encoder runs once per request (bidirectional attention, in the step that admits it) and each
decoder layer writes the encoder output's K/V into the request's cross blocks; the decoder then
steps with every other sequence on the paged cache. T5's own traits: no attention scaling, a
learned bias per bucket of relative position (bidirectional buckets in the encoder, causal in the
decoder; computed by the first layer's table and shared by all layers of a stack), an RMS norm,
a ReLU or gated-GELU feed-forward, and logits from the decoder output scaled by d_model**-0.5 when
the LM head is tied to the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgserve import distributed as dist
from tgserve.layers.activation import ActAndMul, activation
from tgserve.layers.attention import AttentionInputs, PagedAttention
from tgserve.layers.cross_attention import CrossInputs, EncoderBatch, PagedCrossAttention
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear)
from tgserve.layers.norm import RMSNorm


class RelativeBias(nn.Module):
    """Bias per (head, bucket of key position − query position), T5's log-spaced buckets."""

    def __init__(self, cfg, bidirectional: bool, dtype: torch.dtype):
        super().__init__()
        self.heads = dist.divide(cfg.num_heads, dist.tp_size(), "attention heads")
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.weight = nn.Parameter(torch.empty(self.buckets, self.heads, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded.narrow(1, dist.tp_rank() * self.heads, self.heads))

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        buckets, offset = self.buckets, 0
        if self.bidirectional:
            buckets //= 2
            offset = (relative > 0).long() * buckets
            relative = relative.abs()
        else:
            relative = -torch.clamp(relative, max=0)
        exact = buckets // 2
        large = exact + (torch.log(relative.float() / exact) / math.log(self.max_distance / exact)
                         * (buckets - exact)).long()
        large = torch.clamp(large, max=buckets - 1)
        return offset + torch.where(relative < exact, relative, large)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias shaped to add to scores: decode rows [d, heads, 1, keys]; a chunk [heads, q, keys]."""
        relative = key_positions - query_positions
        if relative.dim() == 4:  # decode rows come as [d, 1, 1, keys]
            relative = relative.squeeze(1)
        return F.embedding(self.bucket(relative), self.weight).movedim(-1, -3)


class FeedForward(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.gated = cfg.is_gated_act
        if self.gated:
            self.wi = MergedColumnParallelLinear(cfg.d_model, [cfg.d_ff] * 2, False, dtype)
            self.act = ActAndMul(cfg.dense_act_fn)
        else:
            self.wi = ColumnParallelLinear(cfg.d_model, cfg.d_ff, False, dtype)
            self.act = activation(cfg.dense_act_fn)
        self.wo = RowParallelLinear(cfg.d_ff, cfg.d_model, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype):
        super().__init__()
        self.inner, self.heads = cfg.num_heads * cfg.d_kv, dist.divide(cfg.num_heads, dist.tp_size(), "heads")
        self.d_kv = cfg.d_kv
        self.norm1 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.qkv = QKVParallelLinear(cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_heads, False, dtype)
        self.o = RowParallelLinear(self.inner, cfg.d_model, False, dtype)
        self.norm2 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ff = FeedForward(cfg, dtype)

    def forward(self, x: torch.Tensor, lengths: list[int], biases: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).view(-1, 3, self.heads, self.d_kv).unbind(1)
        out, start = [], 0
        for n, bias in zip(lengths, biases):  # each request attends within its own input, both ways
            rows = slice(start, start + n)
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k[rows].transpose(0, 1),
                                               v[rows].transpose(0, 1), attn_mask=bias.to(q.dtype), scale=1.0)
            out.append(o.transpose(0, 1).reshape(n, -1))
            start += n
        x = x + self.o(torch.cat(out))
        return x + self.ff(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, bias: RelativeBias):
        super().__init__()
        heads = dist.divide(cfg.num_heads, dist.tp_size(), "heads")
        self.heads, self.d_kv, inner = heads, cfg.d_kv, cfg.num_heads * cfg.d_kv
        self.norm1 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.qkv = QKVParallelLinear(cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_heads, False, dtype)
        self.o = RowParallelLinear(inner, cfg.d_model, False, dtype)
        self.attn = PagedAttention(heads, heads, cfg.d_kv, 1.0, position_bias=bias)
        self.norm2 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.cross_q = ColumnParallelLinear(cfg.d_model, inner, False, dtype)
        self.cross_kv = MergedColumnParallelLinear(cfg.d_model, [inner, inner], False, dtype)
        self.cross_o = RowParallelLinear(inner, cfg.d_model, False, dtype)
        self.cross = PagedCrossAttention(self.attn, 1.0)
        self.norm3 = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.ff = FeedForward(cfg, dtype)

    def write_cross(self, encoded: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k, v = self.cross_kv(encoded).view(-1, 2, self.heads, self.d_kv).unbind(1)
        self.cross.write(k, v, slot_mapping)

    def forward(self, x: torch.Tensor, attn: AttentionInputs, cross: CrossInputs, positions: torch.Tensor):
        q, k, v = self.qkv(self.norm1(x)).view(-1, 3, self.heads, self.d_kv).unbind(1)
        x = x + self.o(self.attn(q.contiguous(), k.contiguous(), v.contiguous(), attn))
        q = self.cross_q(self.norm2(x)).view(-1, self.heads, self.d_kv)
        x = x + self.cross_o(self.cross(q, attn, cross))
        return x + self.ff(self.norm3(x))


class T5ForConditionalGeneration(nn.Module):
    is_encoder_decoder = True
    ignored_checkpoint_suffixes = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__()
        self.packed_modules = {"q": ("qkv", "q"), "k": ("qkv", "k"), "v": ("qkv", "v"),
                               "cross_k": ("cross_kv", 0), "cross_v": ("cross_kv", 1)}
        if cfg.is_gated_act:
            self.packed_modules.update(wi_0=("wi", 0), wi_1=("wi", 1))
        self.decoder_start_token_id = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None \
            else (cfg.pad_token_id or 0)
        self.shared = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, dtype)
        self.encoder_bias = RelativeBias(cfg, True, dtype)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.decoder_bias = RelativeBias(cfg, False, dtype)
        layers = cfg.num_decoder_layers if cfg.num_decoder_layers is not None else cfg.num_layers
        self.decoder = nn.ModuleList(DecoderLayer(cfg, dtype, self.decoder_bias) for _ in range(layers))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.d_model, dtype)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie(self.shared)
        scale = getattr(cfg, "scale_decoder_outputs", None)
        self.output_scale = cfg.d_model**-0.5 if (scale if scale is not None else False) else None

    @staticmethod
    def checkpoint_transform(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """T5's checkpoint names → ours (the stacks' numbered sub-layers become named ones)."""
        parts = name.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "block":
            stack, i, sub, rest = parts[0], parts[2], parts[4], ".".join(parts[5:])
            renames = {
                ("encoder", "0"): {"layer_norm.weight": "norm1.weight"},
                ("encoder", "1"): {"layer_norm.weight": "norm2.weight"},
                ("decoder", "0"): {"layer_norm.weight": "norm1.weight"},
                ("decoder", "1"): {"layer_norm.weight": "norm2.weight", "EncDecAttention.q.weight": "cross_q.weight",
                                   "EncDecAttention.k.weight": "cross_k.weight",
                                   "EncDecAttention.v.weight": "cross_v.weight",
                                   "EncDecAttention.o.weight": "cross_o.weight"},
                ("decoder", "2"): {"layer_norm.weight": "norm3.weight"},
            }[(stack, sub)]
            if rest.endswith("relative_attention_bias.weight"):
                return [(f"{stack}_bias.weight", tensor)]
            if rest in renames:
                return [(f"{stack}.{i}.{renames[rest]}", tensor)]
            rest = rest.replace("SelfAttention.", "").replace("DenseReluDense.", "ff.")
            return [(f"{stack}.{i}.{rest}", tensor)]
        if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
            return [(name.split(".")[0] + "_norm.weight", tensor)]
        return [(name, tensor)]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.attn for layer in self.decoder]

    def encode(self, batch: EncoderBatch) -> None:
        """Run the encoder over the admitted requests and write every decoder layer's cross K/V."""
        x = self.shared(batch.input_ids)
        biases = []
        for n in batch.lengths:
            positions = torch.arange(n, device=x.device)
            biases.append(self.encoder_bias(positions[:, None], positions))  # [heads, n, n]
        for layer in self.encoder:
            x = layer(x, batch.lengths, biases)
        x = self.encoder_norm(x)
        for layer in self.decoder:
            layer.write_cross(x, batch.slot_mapping)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs,
                cross: CrossInputs) -> torch.Tensor:
        x = self.shared(input_ids)
        for layer in self.decoder:
            x = layer(x, attn, cross, positions)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.decoder_norm(hidden)
        if self.output_scale is not None:
            x = x * self.output_scale
        return self.lm_head(x)


class MT5ForConditionalGeneration(T5ForConditionalGeneration):
    pass

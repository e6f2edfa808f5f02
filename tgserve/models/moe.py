"""Mixtral and Qwen3-MoE: Llama-family decoders whose MLP is a mixture of experts — only what differs.

Attention, norms, rotary and the decoder block are llama.py's (Qwen3-MoE adds its q/k norm with
the same flag as Qwen3). The differences are in the MLP of each sparse layer, a `FusedMoE`
(layers/moe.py):
- Mixtral: every layer; experts of `intermediate_size`; the top-k weights renormalised.
- Qwen3-MoE: the layers that `decoder_sparse_step` and `mlp_only_layers` pick (the others keep a
  dense MLP of `intermediate_size`); experts of `moe_intermediate_size`; the top-k weights
  renormalised only when `norm_topk_prob`.
Checkpoints name experts one by one (Mixtral's under `block_sparse_moe.`, which transformers
renames to `mlp.` too) or stacked; `expert_tensors` reads every spelling.
"""

from __future__ import annotations

import torch

from tgserve.layers.moe import FusedMoE, expert_packed_modules, expert_tensors
from tgserve.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg, dtype: torch.dtype, max_model_len: int):
        super().__init__(cfg, dtype, max_model_len)
        # Llama's blocks come with dense MLPs (torch.empty storage, never touched); sparse layers
        # replace theirs with experts.
        for i, layer in enumerate(self.model.layers):
            if self.sparse_layer(cfg, i):
                layer.mlp = FusedMoE(cfg.hidden_size, self.expert_size(cfg), cfg.num_local_experts,
                                     cfg.num_experts_per_tok, self.renormalize(cfg), dtype, cfg.hidden_act)
        self.packed_modules = {**type(self).packed_modules, **expert_packed_modules(cfg.num_local_experts)}

    @staticmethod
    def sparse_layer(cfg, index: int) -> bool:
        return True

    @staticmethod
    def expert_size(cfg) -> int:
        return cfg.intermediate_size

    @staticmethod
    def renormalize(cfg) -> bool:
        return True

    def checkpoint_transform(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return expert_tensors(name.replace(".block_sparse_moe.", ".mlp."), tensor)


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    qk_norm = True

    @staticmethod
    def sparse_layer(cfg, index: int) -> bool:
        return (index not in cfg.mlp_only_layers and cfg.num_local_experts > 0
                and (index + 1) % cfg.decoder_sparse_step == 0)

    @staticmethod
    def expert_size(cfg) -> int:
        return cfg.moe_intermediate_size

    @staticmethod
    def renormalize(cfg) -> bool:
        return bool(cfg.norm_topk_prob)

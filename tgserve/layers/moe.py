"""A mixture-of-experts MLP: a replicated router picks each token's top-k experts, and every expert
runs once per step over all of its tokens.

Routing (`route`): softmax over all experts' logits in float32, top-k, then the k weights either
renormalised to sum to 1 (Mixtral; Qwen3-MoE with norm_topk_prob) or kept as they are.

Batching (`FusedMoE.forward`): the tokens × k (token, expert) pairs are sorted by expert, so each
expert's tokens form one contiguous block; a grouped matmul (one matmul per expert over its block)
runs gate|up, the activation, then down; the outputs are weighted, put back in (token, slot) order
and summed over the k slots in float32. This is transformers' own grouped order, which keeps
float32 greedy decoding token-for-token equal to it.

Tensor parallelism: each expert's intermediate dimension is split over ranks (gate|up
column-parallel, down row-parallel); every rank routes every token, and one all-reduce sums the
partial outputs.

Checkpoints name experts one by one (`…experts.N.gate_proj.weight`, Mixtral's `w1/w3/w2`) or, as
transformers 5 holds them in memory, stacked (`…experts.gate_up_proj` [E, 2I, H], `…experts.down_proj`
[E, H, I]). `expert_tensors` spells all of them as one tensor per expert and projection, and
`expert_packed_modules` folds those into the stacked parameters with shard id (expert, part).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tgserve import distributed as dist
from tgserve.layers.activation import ActAndMul
from tgserve.layers.linear import ReplicatedLinear

# checkpoint projection name → ours (Mixtral's w1 / w3 / w2 are gate / up / down)
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
         "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_ONE_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [tokens, experts] → (weights [tokens, k] float32, expert ids [tokens, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [rows, in], sorted by expert with `counts` [experts] rows each, times their
    expert's `weight` [experts, out, in] transposed → [rows, out]."""
    if hasattr(F, "grouped_mm") and (x.device.type == "cpu" or _cuda_grouped_mm(x)):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0, dtype=torch.int32))
    return matmul_per_expert(x, weight, counts)


def matmul_per_expert(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul` where PyTorch has no grouped GEMM for the device or dtype."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, n in enumerate(counts.tolist()):  # one host sync, then one matmul per expert
        if n:
            torch.mm(x[start:start + n], weight[expert].t(), out=out[start:start + n])
            start += n
    return out


def _cuda_grouped_mm(x: torch.Tensor) -> bool:
    """PyTorch's CUDA grouped GEMM takes bfloat16 on compute capability 8.0 and newer."""
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


class ExpertsGateUp(nn.Module):
    """Every expert's gate and up projections: weight [experts, 2 × intermediate/tp, hidden],
    local layout [gate | up] per expert, like MergedColumnParallelLinear's."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.local = dist.divide(intermediate_size, dist.tp_size(), "expert intermediate size")
        self.weight = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int]) -> None:
        """`loaded`: one expert's full gate (part 0) or up (part 1) [intermediate, hidden]."""
        expert, part = shard_id
        shard = loaded.narrow(0, dist.tp_rank() * self.local, self.local)
        _copy(param.data[expert].narrow(0, part * self.local, self.local), shard)


class ExpertsDown(nn.Module):
    """Every expert's down projection, split over ranks by input: weight [experts, hidden, intermediate/tp]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.local = dist.divide(intermediate_size, dist.tp_size(), "expert intermediate size")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.local, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        """`loaded`: one expert's full down projection [hidden, intermediate]."""
        _copy(param.data[shard_id], loaded.narrow(1, dist.tp_rank() * self.local, self.local))


def _copy(target: torch.Tensor, shard: torch.Tensor) -> None:
    if target.shape != shard.shape:
        raise ValueError(f"shape mismatch: expert parameter {tuple(target.shape)} vs checkpoint {tuple(shard.shape)}")
    target.copy_(shard)


class FusedMoE(nn.Module):
    """Router (`gate`) + experts, in place of a dense MLP: [tokens, hidden] → [tokens, hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, dtype: torch.dtype, act: str = "silu"):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts_gate_up = ExpertsGateUp(num_experts, hidden_size, intermediate_size, dtype)
        self.experts_down = ExpertsDown(num_experts, hidden_size, intermediate_size, dtype)
        self.act = ActAndMul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)  # [tokens, k] each
        tokens, k = experts.shape
        pairs = experts.flatten()  # [tokens × k]: pair p is token p // k's slot p % k
        order = pairs.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(pairs, minlength=self.num_experts)  # [experts]
        h = grouped_matmul(x[order // k], self.experts_gate_up.weight, counts)  # [pairs, 2 × intermediate/tp]
        h = grouped_matmul(self.act(h), self.experts_down.weight, counts)  # [pairs, hidden], partial over ranks
        weighted = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        weighted[order] = h * weights.flatten()[order].unsqueeze(1)  # back in (token, slot) order
        out = weighted.view(tokens, k, x.shape[1]).sum(dim=1).to(x.dtype)
        return dist.all_reduce(out)


def expert_packed_modules(num_experts: int) -> dict[str, tuple[str, object]]:
    """The loader's fold for `expert_tensors`' names: 'expert3_up_proj' → ('experts_gate_up', (3, 1))."""
    packed: dict[str, tuple[str, object]] = {}
    for e in range(num_experts):
        packed[f"expert{e}_gate_proj"] = ("experts_gate_up", (e, 0))
        packed[f"expert{e}_up_proj"] = ("experts_gate_up", (e, 1))
        packed[f"expert{e}_down_proj"] = ("experts_down", e)
    return packed


def expert_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor → [(name, tensor)], experts' tensors as one per expert and projection:
    '…mlp.experts.3.w1.weight' → '…mlp.expert3_gate_proj.weight'; a stacked '…mlp.experts.gate_up_proj'
    [E, 2I, H] → E gate and E up views. Other tensors pass unchanged."""
    one = _ONE_EXPERT.match(name)
    if one:
        prefix, expert, proj = one.groups()
        return [(f"{prefix}.expert{expert}_{_PROJ[proj]}.weight", tensor)]
    stacked = _STACKED.match(name)
    if stacked is None:
        return [(name, tensor)]
    prefix, proj = stacked.groups()
    if proj == "down_proj":
        return [(f"{prefix}.expert{e}_down_proj.weight", t) for e, t in enumerate(tensor.unbind(0))]
    out = []
    for e, t in enumerate(tensor.unbind(0)):
        gate, up = t.chunk(2, dim=0)
        out += [(f"{prefix}.expert{e}_gate_proj.weight", gate), (f"{prefix}.expert{e}_up_proj.weight", up)]
    return out

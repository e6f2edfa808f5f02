"""--quantize gptq / awq: int4 checkpoints shipped quantized, served by the int4 method on their own grid.

GPTQ and AWQ store each linear as 4-bit values q, and per group of input features a scale s and a
zero point z: w = (q - z) * s. That is quant/int4.py's layout, w = (q - 8) * scale + zero, with
scale = s and zero = (8 - z) * s: the checkpoint's q values are kept, and our layer dequantizes to
the checkpoint's weight up to the bf16 rounding of scale and zero. Nothing is re-quantized.

The flow: `checkpoint_format` reads config.json's `quantization_config` (and --quantize) and refuses
what the int4 kernel cannot serve; `Format.as_grids` turns each linear's (qweight, qzeros, scales[,
g_idx]) into one `Int4Grid` named `<linear>.weight`, oriented [out, in] like a float weight, so
that the layers' loaders take their tensor-parallel shard of it as of any weight (rows; columns on
group boundaries); `PrequantizedInt4`, the linears' method, gathers a layer's parts and hands the
whole grid to `Int4WeightOnly.load_grid`.

The packings (as AutoGPTQ / GPTQModel pack and unpack them, and AutoAWQ's WQLinear_GEMM):
- GPTQ: qweight int32 [in/8, out], the i-th nibble of a word (bits 4i..4i+3) is input feature
  8r + i; qzeros int32 [groups, out/8], nibble i is output 8c + i; scales fp16 [groups, out];
  g_idx int32 [in], each input feature's group. checkpoint_format "gptq" (v1, the default) stores
  zero points minus one, "gptq_v2" stores them as they are (sym=True: z = 8).
- AWQ (version "gemm"): qweight int32 [in, out/8] and qzeros int32 [groups, out/8] packed along
  the outputs, nibble i holding output 8c + AWQ_ORDER[i]; scales fp16 [groups, out].

Group sizes: the kernel takes 32, 64, 128 or 256. Another multiple of 32 (512, or -1: one group per
row of a layer whose inputs are a multiple of 32) is served exactly, its scales repeated over the
largest such group that divides it. Anything else is a start-up error. A tensor-parallel split of
the input features inside a group is exact too (each side keeps the group's scale and zero) as long
as it falls on a multiple of 32.

desc_act (GPTQ's act-order) with a g_idx other than i // group puts the input features of one
contiguous run into different groups, which one scale per run cannot express. Serving it exactly
would need the inputs permuted by argsort(g_idx), activations included; but q, k and v (gate and
up) of one fused layer each carry their own g_idx over one shared input, and a row-parallel split
would cut across the permutation. So such a linear is dequantized while loading and quantized by
int4's own round-to-nearest in groups of 32, with a warning: correct, a little less accurate than
the checkpoint's grid. (A desc_act checkpoint made with static_groups has i // group: exact.)
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from tgserve.quant.int4 import KERNEL_GROUPS, Int4WeightOnly, fits_kernel
from tgserve.quant.weight_only import _return_freed_memory, warn_once

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
PARTS = ("qweight", "qzeros", "scales", "g_idx")  # a quantized linear's tensors, after its name
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output column 8c + AWQ_ORDER[i]
AWQ_COLUMNS = tuple(AWQ_ORDER.index(c) for c in range(8))  # the nibble holding column 8c + j


class UnsupportedCheckpoint(ValueError):
    """A quantized checkpoint this server cannot serve, or --quantize at odds with it."""


# ---- the grid, in the orientation the layers slice --------------------------------------------------


@dataclass
class Int4Grid:
    """One linear's int4 grid oriented like its float weight: w[o, i] = (q[o, i] - 8) * scale[o, g] +
    zero[o, g], g = i // group. The layers' loaders take their shard of it as of a float weight
    (`narrow`, `split`); `to(dtype)` keeps it as it is: scale and zero are rounded to bf16 once, when
    the layer packs them."""

    q: torch.Tensor  # uint8 [out, in], 0..15
    scale: torch.Tensor  # float32 [out, in/group]
    zero: torch.Tensor  # float32 [out, in/group]
    group: int

    @classmethod
    def from_zero_points(cls, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> "Int4Grid":
        """A checkpoint's w = (q - z) * s (q [out, in]; s, z [out, in/group]) in our layout."""
        kernel_group(group)  # a group the kernel can serve
        s = s.float()
        return cls(q.to(torch.uint8).contiguous(), s.contiguous(), ((8 - z.float()) * s).contiguous(), group)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def narrow(self, dim: int, start: int, length: int) -> "Int4Grid":
        if dim == 0:
            return Int4Grid(*(t.narrow(0, start, length) for t in (self.q, self.scale, self.zero)), self.group)
        # a split inside a group is exact (both sides keep its scale) down to the kernel's groups of 32
        g = math.gcd(self.group, start, length)
        if g % min(KERNEL_GROUPS):
            raise ValueError(f"input features {start}..{start + length} split this layer's quantization groups "
                             f"finer than the int4 kernel's {min(KERNEL_GROUPS)}: a tensor-parallel split of a "
                             f"pre-quantized layer must fall on multiples of {min(KERNEL_GROUPS)} (try fewer shards)")
        grid = self.refined(g)
        return Int4Grid(grid.q.narrow(1, start, length), grid.scale.narrow(1, start // g, length // g),
                        grid.zero.narrow(1, start // g, length // g), g)

    def split(self, sizes: list[int], dim: int = 0) -> list["Int4Grid"]:
        starts = itertools.accumulate(sizes, initial=0)
        return [self.narrow(dim, start, n) for start, n in zip(starts, sizes)]

    def to(self, *args, **kwargs) -> "Int4Grid":
        return self

    def refined(self, group: int) -> "Int4Grid":
        """The same grid in groups of `group` (a divisor of ours): each scale and zero repeated."""
        if group == self.group:
            return self
        times = self.group // group
        return Int4Grid(self.q, self.scale.repeat_interleave(times, dim=1),
                        self.zero.repeat_interleave(times, dim=1), group)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]."""
        out, inn = self.shape
        q = self.q.float().view(out, inn // self.group, self.group)
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(out, inn)

    def scales_zeros(self) -> torch.Tensor:
        """bf16 [in/group, out, 2]: the kernel's layout."""
        return torch.stack([self.scale, self.zero], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()

    @staticmethod
    def stack(parts: list[tuple[int, "Int4Grid"]], rows: int) -> "Int4Grid":
        """A fused layer's parts ((first row, grid), in any order) as one grid, in groups every part's
        groups divide into."""
        parts = sorted(parts, key=lambda part: part[0])
        starts = list(itertools.accumulate((grid.shape[0] for _, grid in parts), initial=0))
        if [offset for offset, _ in parts] != starts[:-1] or starts[-1] != rows:
            raise ValueError(f"the parts of this layer at rows {[offset for offset, _ in parts]} do not tile its "
                             f"{rows} rows")
        group = math.gcd(*(grid.group for _, grid in parts))
        grids = [grid.refined(group) for _, grid in parts]
        return Int4Grid(*(torch.cat([getattr(g, t) for g in grids]) for t in ("q", "scale", "zero")), group)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"a GPTQ / AWQ weight cannot be changed with `{name}`: this architecture's checkpoint "
                             "layout needs a transform that pre-quantized checkpoints do not get (Llama-family "
                             "checkpoints need none)")


def kernel_group(group: int) -> int:
    """The largest group the int4 kernel takes that divides `group`."""
    for g in sorted(KERNEL_GROUPS, reverse=True):
        if group % g == 0:
            return g
    raise UnsupportedCheckpoint(f"quantization groups of {group} input features: the int4 kernel takes groups of "
                                f"{', '.join(map(str, KERNEL_GROUPS))} (or a multiple of 32, served exactly)")


# ---- the checkpoint formats -------------------------------------------------------------------------


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] → uint8 [..., n, 8]: each word's eight 4-bit values, the i-th from bits 4i."""
    values = torch.empty(*packed.shape, 8, dtype=torch.uint8)
    for i in range(8):
        values[..., i] = (packed >> (4 * i)) & 15
    return values


@dataclass(frozen=True)
class Format:
    """What a checkpoint's quantization_config says about how to read its linears."""

    method: str  # "gptq" or "awq"
    group_size: int  # -1: one group per row
    zeros_minus_one: bool = False  # GPTQ's v1 checkpoint format

    def as_grids(self, tensors: Iterable[tuple[str, torch.Tensor]],
                 names: set[str]) -> Iterator[tuple[str, torch.Tensor | Int4Grid]]:
        """The checkpoint's tensors, each quantized linear's parts (as many as `names`, every name
        in the checkpoint, holds for it) gathered into `<linear>.weight`: an Int4Grid, or a float
        weight where GPTQ's act-order groups cannot be kept. Parts are copied until their linear is
        complete (the reader's views last until the next tensor; a file written by safetensors holds
        every int32 tensor before the fp16 scales, so this keeps up to the packed weights' size)."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors:
            module, _, part = name.rpartition(".")
            if part not in PARTS:
                yield name, tensor
                continue
            parts = pending.setdefault(module, {})
            parts[part] = tensor.clone()
            if all(f"{module}.{p}" not in names or p in parts for p in PARTS):
                del pending[module]
                yield f"{module}.weight", self.linear(module, parts)

    def linear(self, module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor | Int4Grid:
        if module.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
            raise UnsupportedCheckpoint(f"{self.method} checkpoint with a quantized LM head ({module}): only its "
                                        "linear layers can be served quantized")
        missing = {"qweight", "qzeros", "scales"} - set(parts)
        if missing:
            raise UnsupportedCheckpoint(f"{self.method} checkpoint: {module} has no {sorted(missing)}"
                                        + (" (AWQ without zero points is not supported)" if "qzeros" in missing else ""))
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        if self.method == "gptq":  # [in/8, out] packed along the inputs
            q = nibbles(qweight).transpose(1, 2).reshape(-1, qweight.shape[1])  # [in, out]
            z = nibbles(qzeros).flatten(1)[:, : q.shape[1]]  # [groups, out]
        else:  # [in, out/8] packed along the outputs, in AWQ's order
            q = nibbles(qweight)[..., AWQ_COLUMNS].flatten(1)
            z = nibbles(qzeros)[..., AWQ_COLUMNS].flatten(1)
        inn, out = q.shape
        z = z + 1 if self.zeros_minus_one else z  # v1 (a stored 15 is a zero point of 16)
        group = inn if self.group_size == -1 else self.group_size
        groups = math.ceil(inn / group)
        if scales.shape != (groups, out) or z.shape != (groups, out):
            raise UnsupportedCheckpoint(f"{module}: scales {tuple(scales.shape)} and zero points {tuple(z.shape)} do "
                                        f"not fit a {out}x{inn} linear in groups of {group}")
        g_idx = parts.get("g_idx")
        by_run = torch.arange(inn) // group
        if g_idx is None or torch.equal(g_idx.long(), by_run):
            if inn % group:
                raise UnsupportedCheckpoint(f"{module}: {inn} input features in groups of {group}")
            return Int4Grid.from_zero_points(q.t(), scales.t(), z.t(), group)
        warn_once(f"{self.method}-act-order", f"{self.method}: linears quantized with act-order groups (desc_act: "
                  "g_idx is not i // group_size) are dequantized and re-quantized in int4 groups of 32 while loading; "
                  "served correctly, a little less accurately than their own grid")
        g = g_idx.long()
        return ((q.float() - z[g].float()) * scales[g].float()).t().contiguous()  # float32 [out, in]


def checkpoint_format(hf_config, quantize: str | None) -> Format | None:
    """The pre-quantized format of a model's checkpoint (None: a float checkpoint), checked against
    --quantize and against what the int4 kernel serves."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    found = str((qc or {}).get("quant_method", "")).lower() or None
    if quantize in METHODS and found != quantize:
        raise UnsupportedCheckpoint(f"--quantize {quantize}: the checkpoint is not {quantize.upper()}-quantized "
                                    + (f"(config.json's quantization_config says {found!r})" if found else
                                       "(config.json has no quantization_config); to quantize a float checkpoint "
                                       "while loading, use --quantize int4"))
    if found not in METHODS:
        return None
    if quantize is not None and quantize != found:
        raise UnsupportedCheckpoint(f"the checkpoint is {found.upper()}-quantized (config.json's quantization_config): "
                                    f"--quantize {quantize} cannot quantize it again; leave --quantize out or pass "
                                    f"--quantize {found}")
    what = f"{found.upper()} checkpoint"
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise UnsupportedCheckpoint(f"{what} with {bits}-bit weights: only 4-bit ones are served (the int4 kernel)")
    group = qc.get("group_size", qc.get("q_group_size", -1))
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise UnsupportedCheckpoint(f"{what} with a group size of {group!r}")
    if group != -1:
        kernel_group(group)
    if found == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedCheckpoint(f"{what} of version {version!r}: only the GEMM packing is read")
        return Format("awq", group)
    packing = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if qc.get("is_marlin_format") or packing not in ("gptq", "gptq_v2"):
        raise UnsupportedCheckpoint(f"{what} in the {'marlin' if qc.get('is_marlin_format') else packing!r} "
                                    "format: only 'gptq' (v1) and 'gptq_v2' are read")
    if qc.get("lm_head"):
        raise UnsupportedCheckpoint(f"{what} with a quantized LM head: only its linear layers can be served quantized")
    if qc.get("dynamic"):
        raise UnsupportedCheckpoint(f"{what} with per-module overrides (dynamic): not supported")
    if qc.get("desc_act"):
        log.info("GPTQ checkpoint with desc_act: linears whose g_idx is not i // group_size are re-quantized")
    return Format("gptq", group, zeros_minus_one=packing == "gptq")


# ---- the linears' method ----------------------------------------------------------------------------


class PrequantizedInt4(Int4WeightOnly):
    """The linears of a GPTQ / AWQ checkpoint. Each part arrives as an Int4Grid (this rank's shard),
    is kept until the layer's last part is in, and the layer's grid goes to `load_grid` as it is. A
    part that arrives as a float weight (a linear the checkpoint keeps in float, or one dequantized
    for its act-order groups) takes the whole layer through int4's own quantization of floats, as
    does a layer whose shape the kernel cannot take (then int4's int8 fallback)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().create_weights(layer, in_features, out_features, dtype)
        self._grids: list[tuple[int, Int4Grid]] = []

    def load(self, param: nn.Parameter, shard, out_offset: int | None = None) -> None:
        if not isinstance(shard, Int4Grid):
            return super().load(param, shard, out_offset)
        if self.quantized:
            raise ValueError("this layer is already quantized: a part of its weight was loaded twice")
        offset = out_offset or 0
        if shard.shape[1] != param.shape[1] or offset + shard.shape[0] > param.shape[0]:
            raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(shard.shape)} "
                             f"at row {offset}")
        self._grids.append((offset, shard))
        self._rows += shard.shape[0]
        if self._rows >= param.shape[0]:
            self._quantize_staged()

    def _quantize_staged(self) -> None:
        layer = self._layer()
        grids, self._grids = self._grids, []
        if self._staged is None and grids:
            grid = Int4Grid.stack(grids, layer.weight.shape[0])
            if fits_kernel(*grid.shape):
                grid = grid.refined(kernel_group(grid.group))
                with torch.no_grad():
                    self.load_grid(layer, grid.q, grid.scales_zeros(), grid.group)
                self.quantized = True
                del grid, grids
                _return_freed_memory()
                return
            self._staged = grid.dequantize().to(self.dtype)  # int4's int8 fallback takes it
        else:
            for offset, grid in grids:  # beside float parts: the layer is quantized from floats
                self._staged.narrow(0, offset, grid.shape[0]).copy_(grid.dequantize())
        super()._quantize_staged()

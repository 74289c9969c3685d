"""The shared structure in memory: `SharedLinear` = anchor weight (not a copy) + low-rank delta A·B.

The anchor's nn.Linear is held by reference outside the module tree, so `named_parameters()` / `state_dict()` never
see the anchor weight twice: it is stored once and counted once. During training a SharedLinear also keeps the
original weight of its block (a non-persistent buffer): that is the teacher (all blocks in original mode) and the
"not yet replaced" side of progressive module replacement. `finalize()` drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.errors import FormatError
from deltapack.share.plan import SharePlan, svd_init


class SharedLinear(nn.Module):
    def __init__(
        self,
        anchor: nn.Linear,
        delta_a: torch.Tensor,
        delta_b: torch.Tensor,
        bias: torch.Tensor | None = None,
        original: torch.Tensor | None = None,
    ):
        super().__init__()
        self._anchor = (anchor,)  # a tuple keeps it out of the module tree: stored and counted once, in its block
        self.out_features, self.in_features = anchor.out_features, anchor.in_features
        self.delta_a = nn.Parameter(delta_a)  # out × r
        self.delta_b = nn.Parameter(delta_b)  # r × in
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.register_buffer("original", original, persistent=False)
        self.use_original = False

    @property
    def anchor(self) -> nn.Linear:
        return self._anchor[0]

    @property
    def rank(self) -> int:
        return self.delta_b.shape[0]

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_a + A·B computed in fp32 and rounded once: the dense export writes exactly this."""
        w = self.anchor.weight
        return (w.float() + self.delta_a.float() @ self.delta_b.float()).to(dtype or w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_original:
            if self.original is None:
                raise RuntimeError("original weights were dropped (finalize)")
            return F.linear(x, self.original, self.bias)
        tokens = x.numel() // x.shape[-1]
        m, n = self.out_features, self.in_features
        # many tokens (training, prefill): build the weight once; few (decoding): two thin matmuls are cheaper
        if torch.is_grad_enabled() or tokens * (m + n) >= m * n:
            return F.linear(x, self.merged_weight(x.dtype), self.bias)
        y = F.linear(x, self.anchor.weight, self.bias)
        return y + F.linear(F.linear(x, self.delta_b.to(x.dtype)), self.delta_a.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _layers(model: nn.Module, plan: SharePlan) -> nn.ModuleList:
    layers = model.get_submodule(plan.layers_path)
    if len(layers) != plan.num_layers:
        raise FormatError(f"the plan is for {plan.num_layers} blocks, the model has {len(layers)}")
    return layers


@torch.no_grad()
def apply_plan(model: nn.Module, plan: SharePlan, *, init: str = "svd", keep_original: bool = True,
               delta_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each dependent's selected linears by SharedLinear (in place). init "svd": truncated SVD of
    (W_l − W_a); "zeros": empty deltas to be filled from a saved file. Deltas in `delta_dtype` (default: the
    model's; fp32 for training)."""
    layers = _layers(model, plan)
    for sb in plan.blocks:
        for name in plan.modules:
            lin = layers[sb.block].get_submodule(name)
            anchor = layers[sb.anchor].get_submodule(name)
            if not isinstance(anchor, nn.Linear) or not isinstance(lin, nn.Linear):
                raise FormatError(f"block {sb.block} {name}: expected plain linear layers (is the plan applied twice?)")
            dt = delta_dtype or lin.weight.dtype
            if init == "svd":
                A, B, _ = svd_init(lin.weight.float() - anchor.weight.float(), sb.rank)
            else:
                A = torch.zeros(lin.out_features, sb.rank, device=lin.weight.device)
                B = torch.zeros(sb.rank, lin.in_features, device=lin.weight.device)
            shared = SharedLinear(
                anchor, A.to(dt), B.to(dt), bias=None if lin.bias is None else lin.bias.detach().clone(),
                original=lin.weight.detach() if keep_original else None,
            )
            layers[sb.block].set_submodule(name, shared)
    return model


def shared_linears(model: nn.Module) -> dict[str, SharedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SharedLinear)}


def set_original_blocks(model: nn.Module, plan: SharePlan, original: set[int]) -> None:
    """Blocks in `original` run their original weights (teacher / not yet replaced); the rest their shared form."""
    layers = _layers(model, plan)
    for sb in plan.blocks:
        for name in plan.modules:
            layers[sb.block].get_submodule(name).use_original = sb.block in original


@torch.no_grad()
def finalize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Drop the original weights and store deltas in the model's dtype (what is saved is what runs)."""
    for m in shared_linears(model).values():
        m.original = None
        m.use_original = False
        dt = dtype or m.anchor.weight.dtype
        m.delta_a.data = m.delta_a.data.to(dt)
        m.delta_b.data = m.delta_b.data.to(dt)
    return model


def trainable_parameters(model: nn.Module, plan: SharePlan, train_norms: bool = False) -> dict[str, nn.Parameter]:
    """The deltas (and, optionally, the norm weights of dependent blocks) by name."""
    out = {}
    for n, m in shared_linears(model).items():
        out[f"{n}.delta_a"] = m.delta_a
        out[f"{n}.delta_b"] = m.delta_b
    if train_norms:
        dependents = {b.block for b in plan.blocks}
        for n, p in model.named_parameters():
            parts = n.split(".")
            if "norm" in n and n.startswith(plan.layers_path + ".") and int(parts[len(plan.layers_path.split("."))]) in dependents:
                out[n] = p
    return out


def block_parameters(model: nn.Module, layers_path: str, exclude: set[str]) -> dict[str, nn.Parameter]:
    """Every other parameter of the transformer blocks under `layers_path` (anchors, attention, intact blocks, norms),
    by name: what `TrainConfig.block_lr` trains beside the deltas. Embeddings, the final norm and the head stay frozen."""
    prefix = layers_path + "."
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix) and n not in exclude}


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain checkpoint: every SharedLinear's weight rebuilt as W_a + A·B, tied weights once (HF convention)."""
    sd = {}
    shared = shared_linears(model)
    for n, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        mod, _, leaf = n.rpartition(".")
        if mod in shared:
            if leaf in ("delta_a", "delta_b"):
                continue
        sd[n] = p.detach()
    for n, m in shared.items():
        sd[f"{n}.weight"] = m.merged_weight()
    return sd

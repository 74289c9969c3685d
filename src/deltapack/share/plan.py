"""Which blocks share weights with which anchor, at what rank: the budget rule, the criterion and the choice.

Structure (DeltaLLM): a *dependent* block l reuses the selected linear weights of an earlier *anchor* block a plus a
trained low-rank delta, W_l ≈ W_a + A_l·B_l. The first two and the last two blocks are never dependents (they may
be anchors). An anchor is the nearest block below l that is not itself a dependent, at most `group` blocks below:
pattern "alternating" is group 1 (anchor, dependent, anchor, ...); "sequential" lets one anchor feed up to
`group` following blocks (default 3).

Budget rule (exact integers; P = unique parameters of the model, embeddings and lm_head included, tied ones once):
  * target removed T = ceil(reduction · P).
  * Sharing one block's selected matrices removes F = Σ m·n and costs c·r for a rank-r delta, c = Σ (m + n).
  * start rank r0 = --rank, or by default ⌊F / (2c)⌋ (the delta would be half of what it replaces: more dependents
    at a higher rank each: on SmolLM2-135M at -12% and 8M training tokens, KL 0.219 with 13 dependents at rank 222
    against 0.251 with ⌊F/(4c)⌋'s 9 at 135; 16 at 259 and 20 at 291 did no better; bench/results/share_rank_sweep.md).
  * number of dependents n = the smallest n with n·(F − c·r0) ≥ T, capped by what the pattern can hold; if the
    resulting rank would exceed the cap (min(m, n) − 1 of the smallest matrix), n grows instead.
  * the whole delta budget D = n·F − T is then spent: every dependent gets ⌊D / (n·c)⌋ and the remaining whole rank
    units go, one each, to the dependents with the highest criterion cost. The achieved removal is ≥ T and exceeds
    it by less than c parameters (one rank unit of one block), and it is reported exactly.

Criterion (measured, recorded per candidate pair (l, a) at the base rank):
  * "kl": mean token KL(original ‖ model with only block l replaced by W_a + SVD_r(W_l − W_a)) on calibration text.
  * "residual": Σ‖(W_l − W_a) − SVD_r(W_l − W_a)‖² / Σ‖W_l‖² over the block's selected matrices (data-free).
The dependents and their anchors are then the set of n blocks with the smallest total cost that the pattern allows
(exact dynamic programme over blocks, assuming per-block costs add up).
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm.auto import tqdm

from deltapack.errors import BudgetError, InputError
from deltapack.linalg import gram_eigh, gram_eigvalsh, smaller_gram

log = logging.getLogger(__name__)

PROTECTED_HEAD = 2  # first blocks never replaced
PROTECTED_TAIL = 2  # last blocks never replaced
MODULE_PREFIXES = {"mlp": ("mlp.",), "attn": ("self_attn.",), "all": ("mlp.", "self_attn.")}
DEFAULT_GROUP = {"sequential": 3, "alternating": 1}


class SharedBlock(BaseModel):
    block: int
    anchor: int
    rank: int
    cost: float | None = None  # the criterion value of this (block, anchor) pair at the base rank


class Candidate(BaseModel):
    block: int
    anchor: int
    cost: float  # the criterion's value
    residual: float  # Σ‖(W_l − W_a) − SVD_r(W_l − W_a)‖² / Σ‖W_l‖² (recorded whatever the criterion)


class ParamCount(BaseModel):
    original: int  # unique parameters of the original model
    target_removed: int
    removed: int
    final: int
    reduction_target: float
    reduction: float  # removed / original, exact division
    shared_per_block: int  # F: weight parameters one dependent stops storing
    per_rank_unit: int  # c: parameters one rank unit of one dependent's delta costs


class SharePlan(BaseModel):
    """Everything needed to rebuild the shared structure on a fresh copy of the original architecture."""

    format: Literal["deltapack-share"] = "deltapack-share"
    version: int = 1
    num_layers: int
    layers_path: str  # e.g. "model.layers"
    module_set: str  # mlp | attn | all
    modules: list[str]  # linear names inside a block, e.g. ["mlp.down_proj", ...]
    shapes: dict[str, list[int]]  # module -> [out, in]
    pattern: str
    group: int
    protected: list[int]
    criterion: str
    base_rank: int
    blocks: list[SharedBlock]
    candidates: list[Candidate] = Field(default_factory=list)
    params: ParamCount
    rule: str = "see deltapack.share.plan module docstring"


# ---- model structure helpers -------------------------------------------------------------------------------------


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (name, list): the first one as long as config.num_hidden_layers."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise InputError("cannot find the model's list of transformer blocks (expected e.g. model.layers)")


def block_linears(block: nn.Module, module_set: str) -> dict[str, nn.Linear]:
    if module_set not in MODULE_PREFIXES:
        raise InputError(f"--modules must be one of {', '.join(MODULE_PREFIXES)}, not {module_set!r}")
    prefixes = MODULE_PREFIXES[module_set]
    found = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)}
    if not found:
        have = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
        raise InputError(f"no linear layers under {'/'.join(prefixes)} in a block (this architecture has: {have})")
    return dict(sorted(found.items()))


def unique_param_count(model: nn.Module) -> int:
    """Parameters counted once per storage (tied embeddings and shared anchors once)."""
    seen: set[tuple[int, int, tuple]] = set()
    total = 0
    for p in model.parameters():  # already de-duplicated by identity
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) if p.device.type != "meta" else (id(p), 0, ())
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


# ---- budget ------------------------------------------------------------------------------------------------------


def max_dependents(num_layers: int, group: int) -> int:
    return _choose(num_layers, group, n=None, cost=lambda l, a: 0.0)[0]


def _eligible(num_layers: int) -> range:
    return range(PROTECTED_HEAD, num_layers - PROTECTED_TAIL)


def budget(
    original: int, shared_per_block: int, per_rank_unit: int, reduction: float, n_max: int, rank: int | None, rank_cap: int
) -> tuple[int, int, int, int]:
    """(n dependents, base rank, extra rank units, target removed) following the module docstring's rule."""
    if not 0 < reduction < 1:
        raise InputError(f"--reduction must be between 0 and 1 (a fraction of parameters), not {reduction}")
    F, c = shared_per_block, per_rank_unit
    target = math.ceil(Fraction(str(reduction)) * original)
    if n_max <= 0:
        raise BudgetError("the model has too few blocks to share (the first two and last two stay intact)")
    if n_max * F < target:
        raise BudgetError(
            f"removing {reduction:.1%} needs {target} parameters, but sharing every eligible block's weights removes "
            f"at most {n_max * F} ({n_max * F / original:.1%}); use --modules all or a smaller --reduction"
        )
    r0 = rank if rank is not None else F // (2 * c)
    if r0 < 0 or r0 > rank_cap:
        raise InputError(f"--rank must be between 0 and {rank_cap}, not {r0}")
    saving = F - c * r0
    n = min(n_max, max(1, math.ceil(target / saving))) if saving > 0 else n_max
    while True:
        spend = n * F - target
        r = spend // (n * c)
        if r <= rank_cap or n == n_max:
            break
        n += 1
    if r > rank_cap:
        r, extra = rank_cap, 0  # cannot spend it all: the reduction overshoots (reported)
        log.warning("rank cap %d reached: the reduction exceeds the target", rank_cap)
    else:
        extra = (spend - n * c * r) // c
        if r == rank_cap:
            extra = 0
    return n, r, extra, target


# ---- choice ------------------------------------------------------------------------------------------------------


def _choose(num_layers: int, group: int, n: int | None, cost) -> tuple[int, list[tuple[int, int]]]:
    """Exact DP: pick dependents (with anchor = nearest kept block below, within `group`) minimising Σ cost.

    n=None: return the largest feasible count (and one arrangement). Returns (count, [(block, anchor), ...])."""
    INF = float("inf")
    eligible = set(_eligible(num_layers))
    # state after processing block b: (count, anchor) -> (cost, back-pointer)
    states: dict[tuple[int, int], tuple[float, tuple | None, tuple[int, int] | None]] = {(0, 0): (0.0, None, None)}
    history = [states]
    for b in range(1, num_layers):
        nxt: dict[tuple[int, int], tuple[float, tuple | None, tuple[int, int] | None]] = {}
        for (k, a), (val, _, _) in states.items():
            # b kept: it becomes the anchor for what follows
            key = (k, b)
            if val < nxt.get(key, (INF,))[0]:
                nxt[key] = (val, (k, a), None)
            if b in eligible and b - a <= group and (n is None or k < n):
                v = val + cost(b, a)
                key = (k + 1, a)
                if v < nxt.get(key, (INF,))[0]:
                    nxt[key] = (v, (k, a), (b, a))
        states = nxt
        history.append(states)
    if n is None:
        n = max(k for k, _ in states)
    finals = [(v[0], s) for s, v in states.items() if s[0] == n]
    if not finals:
        raise BudgetError(f"the pattern cannot hold {n} dependent blocks in {num_layers} layers")
    _, s = min(finals)
    pairs = []
    for b in range(num_layers - 1, 0, -1):
        _, prev, pair = history[b][s]
        if pair is not None:
            pairs.append(pair)
        s = prev
    return n, sorted(pairs)


def svd_init(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, singular values) with A·B the best rank-`rank` approximation of `delta`, √S folded into both sides.

    Through the eigendecomposition of the fp64 Gram matrix of the smaller side: ~4x faster than a full SVD on CPU
    and on GPU for these shapes, and fp64 keeps the squared condition number harmless for the top vectors."""
    d = delta.double()
    gram, tall = smaller_gram(d)
    evals, evecs = gram_eigh(gram)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    S = evals.sqrt()
    rs = S[:rank].clamp_min(S[0] * 1e-12 if len(S) else 0.0).sqrt()
    if tall:  # evecs = V: A = Δ·V_r / √S_r, B = √S_r·V_rᵀ
        V = evecs[:, :rank]
        A, B = (d @ V) / rs, rs[:, None] * V.T
    else:  # evecs = U: A = U_r·√S_r, B = U_rᵀ·Δ / √S_r
        U = evecs[:, :rank]
        A, B = U * rs, (U.T @ d) / rs[:, None]
    return A.float(), B.float(), S.float()


@torch.no_grad()
def _residual(layers, module_names, l, a, rank) -> float:
    num = den = 0.0
    for name in module_names:
        wl = layers[l].get_submodule(name).weight.float()
        d = (wl - layers[a].get_submodule(name).weight.float()).double()
        energy = gram_eigvalsh(smaller_gram(d)[0]).flip(0).clamp_min(0)
        num += float(energy[rank:].sum())
        den += float(wl.double().pow(2).sum())
    return num / max(den, 1e-30)


@torch.no_grad()
def _kl_costs(model, layers, module_names, pairs, rank, calib: torch.Tensor, batch: int, progress: bool) -> dict:
    """KL(original ‖ block l replaced by its SVD init against anchor a), one pair at a time, weights swapped in place.
    Also returns each pair's relative residual (free: the SVD is computed anyway)."""
    from deltapack.share.evaluate import batched_kl, teacher_logprobs

    model.eval()
    teacher = teacher_logprobs(model, calib, batch)
    kl, residual = {}, {}
    for l, a in tqdm(pairs, desc="criterion (kl)", disable=not progress):
        saved, num, den = {}, 0.0, 0.0
        for name in module_names:
            lin = layers[l].get_submodule(name)
            wa = layers[a].get_submodule(name).weight.float()
            A, B, S = svd_init(lin.weight.float() - wa, rank)
            num += float(S[rank:].double().pow(2).sum())
            den += float(lin.weight.double().pow(2).sum())
            saved[name] = lin.weight.detach().clone()
            lin.weight.copy_((wa + A @ B).to(lin.weight.dtype))
        try:
            kl[(l, a)] = batched_kl(model, calib, teacher, batch)
        finally:
            for name, w in saved.items():
                layers[l].get_submodule(name).weight.copy_(w)
        residual[(l, a)] = num / max(den, 1e-30)
    return kl, residual


class _Sizing(NamedTuple):
    """What make_plan decides before measuring the criterion (names as in the module docstring)."""

    layers_path: str
    layers: nn.ModuleList
    names: list[str]
    shapes: dict[str, list[int]]
    group: int
    F: int  # shared parameters per block
    c: int  # parameters per rank unit of one dependent's deltas
    P: int  # the model's unique parameters
    n: int  # dependents
    r: int  # base rank
    extra: int  # dependents that get rank r + 1
    target: int  # parameters to remove


def _sized(model: nn.Module, reduction: float, pattern: str, module_set: str, rank: int | None, group: int | None,
           criterion: str, has_calib: bool) -> _Sizing:
    """Validate a plan's arguments and size it."""
    if pattern not in DEFAULT_GROUP:
        raise InputError(f"--pattern must be sequential or alternating, not {pattern!r}")
    if criterion not in ("kl", "residual"):
        raise InputError(f"criterion must be kl or residual, not {criterion!r}")
    if criterion == "kl" and not has_calib:
        raise InputError("the kl criterion needs calibration tokens")
    group = 1 if pattern == "alternating" else (group or DEFAULT_GROUP[pattern])
    if group < 1:
        raise InputError("--group must be at least 1")
    layers_path, layers = find_layers(model)
    lins = block_linears(layers[0], module_set)
    shapes = {n: [m.out_features, m.in_features] for n, m in lins.items()}
    F = sum(o * i for o, i in shapes.values())
    c = sum(o + i for o, i in shapes.values())
    rank_cap = min(min(s) for s in shapes.values()) - 1
    P = unique_param_count(model)
    n, r, extra, target = budget(P, F, c, reduction, max_dependents(len(layers), group), rank, rank_cap)
    return _Sizing(layers_path, layers, list(lins), shapes, group, F, c, P, n, r, extra, target)


def check_plan(model: nn.Module, *, reduction: float, pattern: str = "sequential", module_set: str = "mlp",
               rank: int | None = None, group: int | None = None, criterion: str = "kl") -> None:
    """Raise InputError/BudgetError now for arguments make_plan would refuse, before minutes of data generation."""
    _sized(model, reduction, pattern, module_set, rank, group, criterion, has_calib=True)


def make_plan(
    model: nn.Module,
    *,
    reduction: float,
    pattern: str = "sequential",
    module_set: str = "mlp",
    rank: int | None = None,
    group: int | None = None,
    criterion: str = "kl",
    calib: torch.Tensor | None = None,
    calib_batch: int = 8,
    progress: bool = True,
) -> SharePlan:
    """Measure the criterion on `model` (left unchanged) and return the plan. `calib`: LongTensor [N, T] for "kl"."""
    layers_path, layers, names, shapes, group, F, c, P, n, r, extra, target = _sized(
        model, reduction, pattern, module_set, rank, group, criterion, has_calib=calib is not None)
    L = len(layers)

    pairs = [(l, a) for l in _eligible(L) for a in range(max(0, l - group), l)]
    if criterion == "residual":
        residual = {(l, a): _residual(layers, names, l, a, r) for l, a in tqdm(pairs, desc="criterion (residual)", disable=not progress)}
        costs = residual
    else:
        costs, residual = _kl_costs(model, layers, names, pairs, r, calib, calib_batch, progress)
    _, chosen = _choose(L, group, n, lambda l, a: costs[(l, a)])
    # leftover whole rank units go to the dependents the criterion found hardest to approximate
    by_cost = sorted(chosen, key=lambda p: -costs[p])
    plus = set(by_cost[:extra])
    blocks = [SharedBlock(block=l, anchor=a, rank=r + (1 if (l, a) in plus else 0), cost=costs[(l, a)]) for l, a in chosen]
    removed = sum(F - c * b.rank for b in blocks)
    params = ParamCount(
        original=P, target_removed=target, removed=removed, final=P - removed, reduction_target=reduction,
        reduction=removed / P, shared_per_block=F, per_rank_unit=c,
    )
    protected = sorted(set(range(L)) - set(_eligible(L)))
    log.info("share plan: %d dependents at rank %d(+1 for %d), removes %d of %d params (%.4f%%)", n, r, extra, removed, P, 100 * removed / P)
    return SharePlan(
        num_layers=L, layers_path=layers_path, module_set=module_set, modules=names, shapes=shapes, pattern=pattern,
        group=group, protected=protected, criterion=criterion, base_rank=r, blocks=blocks,
        candidates=[Candidate(block=l, anchor=a, cost=v, residual=residual[(l, a)]) for (l, a), v in sorted(costs.items())],
        params=params,
    )

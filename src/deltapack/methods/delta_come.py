"""delta-come: mixed-precision low-rank deltas (Ping et al. 2024, "Delta-CoMe: Training-Free Delta-Compression with
Mixed-Precision for Large Language Models", NeurIPS 2024), with DeltaMix-style bit allocation.

Per matrix Δ (m x n, out x in): Δ ≈ U·diag(σ)·Vᵀ; singular vector pair i gets a bit width b_i ∈ {8, 4, 3, 2, 1, 0}
(0 = dropped); √σ is folded into both sides, A = √σ·Vᵀ (r x n, input side) and Bt = √σ·Uᵀ (r x m, output side), whose
rows are quantized at their pair's width with asymmetric per-group fp16 scale/zero (quant/rtn.py layout) and
bit-packed into the `factors` codec (one rank group per width, widest first).

Byte accounting: a pair at width b costs qmatrix_bytes(1, n, b, g) + qmatrix_bytes(1, m, b, g): packed codes plus
every scale and zero. The allocators spend at most job.budget_bytes of exactly those bytes, so Encoded.nbytes() is
<= the budget by construction.

Allocators (knob `allocator`):
  "paper"    the official recipe: 2 pairs at 8 bits, 32 at 3 bits, then as many 2-bit pairs as the budget holds (the
             official 4096x4096 16x configuration is 2/32/968 counting payload only; with scales counted fewer fit).
  "optimal"  minimise Σ σ_i²·ε(b_i) under the same byte budget, where ε(b) is the measured relative error of a
             rank-1 term σ·u·vᵀ whose u and v are RTN-quantized at b bits (measured on 16 of the singular pairs of the
             first matrix of each shape and role in the run, then reused). Greedy by marginal gain per byte along the
             lower convex hull of (cost(b), ε(b)): optimal for the LP relaxation; a fill pass spends the remainder.
Group size (knob `group_size`): 128 as in the paper, None = one scale/zero per row, "auto" (default) = per tensor,
whichever of the two gives the lower Σσ²ε at the tensor's budget (per-128 groups cost 0.25 bit per element in fp16
scale+zero, which buys fewer pairs; per-row grids win on Gaussian-like singular vectors).

Quantizers (knob `quantizer`): "gptq" with the layer's input Hessian H = Σ x xᵀ (collected layer by layer on the
fine-tuned model, deltapack/calib/activations.py), "rtn" without calibration, "auto" = gptq when calibration can run
(a tokenizer next to the fine-tune, a Llama-family model), else rtn. Embeddings (and lm_head when tied) have no
input Hessian and always use RTN. Orientation, which the official code gets wrong:
  * A (r x n) is a linear layer on x: GPTQ over its n input columns with H_x; rows of all widths in one problem.
  * The output side B = Btᵀ (m x r) reads z = Â·x, the *quantized* A's output, so its Hessian is H_z = Â H_x Âᵀ,
    one r x r matrix over all rank groups jointly: every group is calibrated on its own true inputs, and the
    cross-group terms are honoured. GPTQ runs over B's r input columns with one grid per column (grid="col"),
    which is exactly one grid per stored row of Bt; columns are processed narrowest width first, so the error of
    coarse columns is compensated by the fine ones quantized after them.
  * Before B is quantized it is refit by least squares to the full delta given Â (knob `refit`, DeltaMix's
    "target corrected for V's quantization error"): B' = Δ H Âᵀ (Â H Âᵀ)⁻¹ (H damped like GPTQ's; H = I under
    RTN). The refit also recovers the part of the dropped tail that lies in Â's row space.
  * Knob `svd`: "plain" (paper) = SVD of Δ; "whitened" = SVD of Δ·L with H + damp = L Lᵀ, so the kept pairs are
    the best rank-r fit of the layer's outputs on the calibration inputs rather than of the weights (SVD-LLM's
    idea applied to the delta). Only where a Hessian exists; the global budget still plans with plain spectra.

Budget (knob `budget`): "uniform" (default) = the same bits per element everywhere (the base allocator); "global" =
the linear layers' bytes go where the spectrum says they buy the most Frobenius error reduction: one greedy over all
linear matrices' singular values jointly, each item (matrix, pair, width step) scored σ²·Δε/Δbytes (ε of Gaussian
vectors, per-row grids), every matrix guaranteed `global_floor` x its uniform share; embeddings and lm_head keep
their uniform share. The spectra (all σ², from the smaller Gram matrix) are gathered in `prepare`, whose
eigenvectors are kept in bounded CPU memory for encode() to reuse. Why uniform is the default: Frobenius energy is
a weak proxy for output error across roles. On SmolLM2-135M with a synthetic structured delta a global pool that
included the (tied) embedding starved it and raised the fine-tune-vs-merged KL; restricted to the linears it ties
with uniform (bench/delta_come/smollm_kl.py -> bench/results/delta_come_smollm_kl.json).
Under both modes the bytes a tensor leaves unspent (less than a pair's worth) roll over to the tensors not yet
encoded. Each tensor's params record its budget ("budget": {"mode", "bytes"}), quantizer, svd and allocation
objective (Σσ²ε / Σσ²).

Note on the driver: `compress` calls allocate() before prepare(), so allocate() cannot see spectra. allocate()
returns the uniform split and keeps a handle on the dict it returned; prepare() rewrites that same dict in place
once the spectra are in, and encode() adds roll-over bytes to it. (Core change asked for: call prepare before
allocate, or let prepare return budgets.)
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator
from tqdm.auto import tqdm

from deltapack import linalg
from deltapack.errors import BudgetError
from deltapack.format.codecs import build_factor_parts
from deltapack.methods.base import (DeltaMethod, Encoded, TensorJob, TensorStat, coded_nbytes, fit_coded_budget,
                                    register_method)
from deltapack.quant.gptq import PreparedHessian, gptq_quantize, prepare_hessian
from deltapack.quant.rtn import QMatrix, qmatrix_bytes, quant_params, quantize_rows, quantize_with

log = logging.getLogger(__name__)

ALLOWED_WIDTHS = (8, 4, 3, 2, 1)
PAPER_COUNTS = ((8, 2), (3, 32))  # then 2-bit to the budget
EPS_SAMPLE = 16  # singular pairs sampled to measure ε(b)
GPTQ_CODED_EXCESS = 1.04  # encode_coded: GPTQ-quantized factors' coded size over the RTN proxy's (measured, worst case)
RTN_CODED_EXCESS = 1.01  # the same for RTN after the least-squares refit of the output side
CODED_HEADROOM = 2  # encode_coded: the SVD keeps pairs for up to this many times the budget (the entropy stage's saving)
UNIT_KEY = "delta_come:unit"
EIG_CACHE_MAX_BYTES = 8 << 30  # CPU memory for Gram eigenvectors kept from prepare() to encode() (saves an eigh each)
DEVICE_HESSIANS_KEY = "delta_come:device_hessians"  # per-unit cache of device copies of input Hessians
DEVICE_HESSIANS_KEPT = 2  # distinct layer inputs kept at once: q/k/v share one, gate/up another (encode order is by name)


def _phase(name: str, device: torch.device | None = None):
    """The driver's phase timer (a no-op unless a benchmark records phases); imported late: compress imports us."""
    from deltapack.compress import phase

    return phase(name, device)


def eig_cache_budget() -> int:
    """Bytes of Gram eigenvectors to keep between the passes: an eighth of the free RAM (the driver pickles the
    cache per work unit, briefly doubling it), at most 8 GiB."""
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep nothing
        return 0
    return int(min(EIG_CACHE_MAX_BYTES, free // 8))


# ---- costs and errors -------------------------------------------------------------------------------------------------
def pair_bytes(m: int, n: int, bits: int, group_size: int | None) -> int:
    """Stored bytes of one singular pair (a row of A and a row of Bt) at `bits`, scales and zeros included."""
    if bits == 0:
        return 0
    return qmatrix_bytes(1, n, bits, group_size) + qmatrix_bytes(1, m, bits, group_size)


def rank1_error(a: torch.Tensor, a_hat: torch.Tensor, b: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """‖a bᵀ − â b̂ᵀ‖² / ‖a bᵀ‖² per row pair (rows of a and b are the pairs), without forming the outer products."""
    na, nb = (a * a).sum(1), (b * b).sum(1)
    nah, nbh = (a_hat * a_hat).sum(1), (b_hat * b_hat).sum(1)
    cross = (a * a_hat).sum(1) * (b * b_hat).sum(1)
    return ((na * nb + nah * nbh - 2 * cross) / (na * nb).clamp_min(1e-30)).clamp_min(0)


def measure_eps(A0: torch.Tensor, Bt0: torch.Tensor, widths, group_size: int | None) -> dict[int, float]:
    """ε(b): mean relative error of a rank-1 term whose two factors are RTN-quantized at b bits, measured on a sample
    of this matrix's own pairs. Forced non-increasing in b (a wider code never does worse in expectation)."""
    k = A0.shape[0]
    idx = torch.linspace(0, k - 1, min(k, EPS_SAMPLE)).round().long().unique().to(A0.device)
    a, b = A0[idx], Bt0[idx]
    eps = {0: 1.0}
    prev = 1.0
    for w in sorted(widths):
        e = float(rank1_error(a, rtn_roundtrip(a, w, group_size), b, rtn_roundtrip(b, w, group_size)).mean())
        prev = min(prev, e)
        eps[w] = prev
    return eps


def rtn_roundtrip(x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """quantize_rows(x).dequantize() without the bit packing: same numbers, a third of the time."""
    rows, cols = x.shape
    scale, zero, gs = quant_params(x, bits, group_size)
    q = quantize_with(x, scale, zero, bits, gs).float()
    ng = scale.shape[1]
    if ng * gs != cols:
        q = torch.cat([q, q.new_zeros(rows, ng * gs - cols)], 1)
    y = q.view(rows, ng, gs) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return y.view(rows, -1)[:, :cols]


_GAUSS_EPS: dict[tuple, dict[int, float]] = {}


def gaussian_eps(m: int, n: int, widths, group_size: int | None) -> dict[int, float]:
    """ε(b) for Gaussian singular vectors of lengths m and n (planning, before any vector is computed)."""
    key = (m, n, tuple(sorted(widths)), group_size)
    if key not in _GAUSS_EPS:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(16, n, generator=g)
        b = torch.randn(16, m, generator=g)
        _GAUSS_EPS[key] = measure_eps(a, b, widths, group_size)
    return _GAUSS_EPS[key]


def hull_steps(costs: dict[int, int], eps: dict[int, float]) -> list[tuple[int, int, float]]:
    """Lower convex hull of the points (cost(b), ε(b)) from width 0: the upgrade steps a greedy by gain per byte takes,
    as (from width, to width, gain per byte per unit σ²), gains strictly decreasing."""
    pts = sorted((costs[w], eps[w], w) for w in eps)
    hull: list[tuple[int, float, int]] = []
    for p in pts:
        if hull and p[0] == hull[-1][0]:
            if p[1] < hull[-1][1]:
                hull[-1] = p
            continue
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord (not convex)
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    steps = []
    for (c1, e1, w1), (c2, e2, w2) in zip(hull, hull[1:]):
        gain = (e1 - e2) / (c2 - c1)
        if gain <= 0:
            break
        steps.append((w1, w2, gain))
    return steps


def allocate_optimal(sigma2: torch.Tensor, costs: dict[int, int], eps: dict[int, float], budget: int) -> torch.Tensor:
    """Bit width per pair minimising Σ σ_i² ε(b_i) subject to Σ cost(b_i) <= budget (greedy by gain per byte).
    Returns a LongTensor of widths (0 = dropped), on the CPU."""
    s2 = sigma2.detach().double().cpu()
    k = s2.numel()
    bits = torch.zeros(k, dtype=torch.long)
    steps = hull_steps(costs, eps)
    if not steps or k == 0:
        return bits
    gains = torch.tensor([g for _, _, g in steps], dtype=torch.float64)
    step_cost = torch.tensor([costs[w2] - costs[w1] for w1, w2, _ in steps], dtype=torch.long)
    to_width = torch.tensor([w2 for _, w2, _ in steps], dtype=torch.long)
    rate = (s2[:, None] * gains[None, :]).reshape(-1)  # item (pair i, step j) at i*J + j
    cost = step_cost.repeat(k)
    J = len(steps)
    order = torch.argsort(rate, descending=True, stable=True)
    csum = torch.cumsum(cost[order], 0)
    n_take = int(torch.searchsorted(csum, torch.tensor([budget]), right=True)[0])
    positive = int((rate[order] > 0).sum())
    n_take = min(n_take, positive)
    taken = torch.zeros(k * J, dtype=torch.bool)
    taken[order[:n_take]] = True
    left = budget - (int(csum[n_take - 1]) if n_take else 0)
    # fill: later items that still fit, in gain order, each only after its pair's previous step (plain Python lists:
    # this loop may visit every remaining item)
    min_cost = int(step_cost.min())
    if left >= min_cost and n_take < positive:
        taken_l = taken.tolist()
        cost_l = cost.tolist()
        for it in order[n_take:positive].tolist():
            c = cost_l[it]
            if c > left or (it % J and not taken_l[it - 1]):
                continue
            taken_l[it] = True
            left -= c
            if left < min_cost:
                break
        taken = torch.tensor(taken_l, dtype=torch.bool)
    steps_taken = taken.view(k, J).sum(1)
    has = steps_taken > 0
    bits[has] = to_width[steps_taken[has] - 1]
    return bits


def allocate_paper(k: int, costs: dict[int, int], budget: int, counts=PAPER_COUNTS) -> torch.Tensor:
    """Official Delta-CoMe split: a few 8-bit pairs, then 3-bit, then 2-bit pairs as long as the budget lasts."""
    bits = torch.zeros(k, dtype=torch.long)
    i, left = 0, budget
    for w, cnt in (*counts, (2, k)):
        take = min(cnt, k - i, left // costs[w])
        bits[i : i + take] = w
        i += take
        left -= take * costs[w]
    return bits


def allocation_objective(sigma2: torch.Tensor, bits: torch.Tensor, eps: dict[int, float]) -> float:
    e = torch.tensor([eps[int(b)] for b in bits.tolist()], dtype=torch.float64)
    return float((sigma2.double().cpu() * e).sum())


# ---- spectra ---------------------------------------------------------------------------------------------------------
def gram_eigh(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ² descending, eigenvectors of the smaller Gram matrix: V when n <= m, else U)."""
    evals, evecs = linalg.gram_eigh(linalg.smaller_gram(delta)[0])
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def gram_svd(
    delta: torch.Tensor, k: int, eig: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U m x k, σ k, V n x k) from eigh of the smaller Gram matrix: ~10x faster than a full
    SVD on GPU and enough precision for the pairs a budget keeps (σ within ~1e-3 of σ_max). `eig`: a gram_eigh
    result computed earlier."""
    m, n = delta.shape
    k = min(k, m, n)
    small_in = n <= m
    evals, evecs = eig if eig is not None else gram_eigh(delta)
    evals, evecs = evals[:k].to(delta.device), evecs[:, :k].to(delta.device)
    S = evals.sqrt()
    other = delta @ evecs if small_in else delta.T @ evecs  # = other-side vectors * σ
    other = other / other.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return (other, S, evecs) if small_in else (evecs, S, other)


def singular_values2(delta: torch.Tensor) -> torch.Tensor:
    """All σ² (descending) from eigvalsh of the smaller Gram matrix."""
    return linalg.gram_eigvalsh(linalg.smaller_gram(delta)[0]).flip(0).clamp_min(0)


# ---- the method ------------------------------------------------------------------------------------------------------
@register_method
class DeltaCoMe(DeltaMethod):
    name = "delta-come"
    paper = "Ping et al. 2024, Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for LLMs (NeurIPS)"
    summary = "mixed-precision SVD (8/4/3/2/1-bit singular vectors by σ), GPTQ on layer-by-layer calibration"
    uses_calibration = True
    # A and Bt: codes, scale, zero = 6 parts per matrix; the driver applies this to every tensor, 1-D ones (1 part)
    # included, so the honest average over a Llama (about 3 matrices per vector) is 5
    parts_per_tensor = 5
    # manifest bytes of the params beyond what the driver's per-tensor estimate already covers (it counts every
    # tensor, 1-D ones included, at parts_per_tensor parts, which over-covers the small dense tensors)
    params_bytes: ClassVar[int] = 60

    allocator: Literal["optimal", "paper"] = Field("optimal", description="bit widths per singular pair")
    bit_widths: tuple[int, ...] = Field(ALLOWED_WIDTHS, description="widths 'optimal' may use")
    quantizer: Literal["auto", "gptq", "rtn"] = Field("auto", description="gptq with calibration, rtn without")
    budget: Literal["uniform", "global"] = Field("uniform", description="bytes per tensor uniform, or by spectrum")
    global_floor: float = Field(0.25, ge=0, le=1, description="global budget: least share of the uniform split")
    group_size: int | Literal["auto"] | None = Field(
        "auto", description="columns per scale/zero group; None: one per row; auto: 128 or per row, per tensor"
    )
    blocksize: int = Field(128, ge=1, description="GPTQ lazy-update block")
    percdamp: float = Field(0.01, gt=0, description="GPTQ damping, fraction of mean diag(H)")
    act_order: bool = Field(True, description="GPTQ: input columns by descending diag(H)")
    refit: bool = Field(True, description="least-squares refit of Bt to Δ given the quantized A")
    svd: Literal["plain", "whitened"] = Field(
        "plain", description="SVD of Δ (paper), or of Δ·chol(H) when calibrated (fits outputs, not weights)"
    )
    n_calib_seqs: int | None = Field(None, ge=1, description="calibration sequences (default 128 on GPU, 16 on CPU)")
    calib_seq_len: int | None = Field(None, ge=8, description="tokens per sequence (default 2048 on GPU, 256 on CPU)")
    calib_source: Literal["text", "random"] = Field("text", description="calibration tokens: text or random ids")

    _plan: dict = PrivateAttr(default_factory=dict)

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, v):
        if isinstance(v, int) and v < 8:
            raise ValueError("group_size must be at least 8 (or None, or 'auto')")
        return v

    @field_validator("bit_widths")
    @classmethod
    def _check_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [w for w in v if w not in ALLOWED_WIDTHS]
        if bad or not v:
            raise ValueError(f"bit widths must be a non-empty subset of {ALLOWED_WIDTHS}, got {list(v)}")
        return tuple(sorted(set(v), reverse=True))

    # ---- planning ----------------------------------------------------------------------------------------------
    def _widths(self) -> tuple[int, ...]:
        return (8, 3, 2) if self.allocator == "paper" else tuple(self.bit_widths)

    def _group_sizes(self) -> list[int | None]:
        """Candidate group sizes: "auto" tries per-128 groups and one group per row, per tensor."""
        return [128, None] if self.group_size == "auto" else [self.group_size]

    def _costs(self, shape, group_size: int | None) -> dict[int, int]:
        m, n = shape
        return {w: pair_bytes(m, n, w, group_size) for w in (0, *self._widths())}

    def min_bytes(self, shape):
        return min(min(v for w, v in self._costs(shape, gs).items() if w) for gs in self._group_sizes())

    def max_useful_bytes(self, shape):
        return max(self._costs(shape, gs)[max(self._widths())] for gs in self._group_sizes()) * min(shape)

    def allocate(self, stats: list[TensorStat], total_bytes: int) -> dict[str, int]:
        alloc = super().allocate(stats, total_bytes)
        self._plan.clear()
        # kept by reference: prepare() re-splits it under budget="global", and encode() rolls each tensor's unspent
        # bytes over to the tensors not yet encoded (the driver reads the dict tensor by tensor)
        self._plan.update(alloc=alloc, total=sum(alloc.values()), uniform=dict(alloc), done=set())
        return alloc

    def prepare(self, ctx, matrices: list[TensorStat]) -> None:
        """Calibration (when GPTQ runs) and the global budget split."""
        state = ctx.cache.setdefault("delta_come", {})
        state["quantizer"] = self._resolve_quantizer(ctx)
        ctx.cache[UNIT_KEY] = {s.name: True for s in matrices}  # name-keyed: the driver slices it per work unit
        if state["quantizer"] == "gptq" and "hessians" not in ctx.cache:
            t0 = time.perf_counter()
            with _phase("prepare.calibration", ctx.device):
                self._calibrate(ctx, matrices)
            log.info("delta-come: calibration took %.1f s", time.perf_counter() - t0)
        has_linear = any(s.kind == "linear" for s in matrices)
        if self.budget == "global" and self._plan.get("alloc") is not None and has_linear:
            t0 = time.perf_counter()
            with _phase("prepare.spectra", ctx.device):
                self._global_split(ctx, matrices)
            log.info("delta-come: spectra and global budget took %.1f s", time.perf_counter() - t0)

    def _resolve_quantizer(self, ctx) -> str:
        from deltapack.calib.activations import CalibrationError, has_tokenizer

        if self.quantizer == "rtn":
            return "rtn"
        if self.calib_source == "random" or has_tokenizer(ctx.finetuned):
            return "gptq"
        if self.quantizer == "gptq" or ctx.calib_path:
            raise CalibrationError(
                f"{ctx.finetuned.ref} has no tokenizer, so the calibration text cannot be tokenized "
                "(put the tokenizer next to the weights, or use quantizer=rtn without --calib)"
            )
        log.info("delta-come: %s has no tokenizer; no calibration, quantizing with RTN", ctx.finetuned.ref)
        return "rtn"

    def _calibrate(self, ctx, matrices: list[TensorStat]) -> None:
        from deltapack.calib.activations import (UnsupportedArchitecture, calibration_tokens, collect_hessians,
                                                 hessian_device_budget)

        gpu = ctx.device.type == "cuda"
        n_seqs = self.n_calib_seqs or (128 if gpu else 16)
        seq_len = self.calib_seq_len or (2048 if gpu else 256)
        max_pos = ctx.finetuned.config().get("max_position_embeddings")
        if max_pos:
            seq_len = min(seq_len, int(max_pos))
        ids, record = calibration_tokens(ctx, n_seqs, seq_len, self.calib_source)
        try:
            hess = collect_hessians(ctx.finetuned, ids, ctx.device, progress=ctx.progress,
                                    device_budget=hessian_device_budget(ctx))
        except UnsupportedArchitecture as e:
            if self.quantizer == "gptq":
                raise
            log.warning("delta-come: %s; quantizing with RTN", e)
            ctx.cache["delta_come"]["quantizer"] = "rtn"
            return
        # only the Hessians of tensors to encode: the driver hands name-keyed entries of unchanged tensors to every
        # work unit, and a layer's are hundreds of MB
        wanted = {s.name for s in matrices}
        ctx.cache["hessians"] = {n: h for n, h in hess.items() if n in wanted}
        ctx.cache["calibration_record"] = record
        log.info("delta-come: calibrated on %d x %d tokens (%s)", record["n_seqs"], record["seq_len"], record["source"])

    def _global_split(self, ctx, matrices: list[TensorStat]) -> None:
        """One greedy over every linear matrix's singular values: find the gain-per-byte threshold λ at which the bytes
        they want (each at least global_floor x its uniform share) add up to their uniform total.

        Embeddings and lm_head keep their uniform share: their weight-space energy says little about what they do to
        the outputs (a row of an embedding only matters when its token appears; a tied embedding is the lm_head as
        well), and on SmolLM2-135M letting them into the pool starved the tied embedding and raised the KL."""
        alloc: dict[str, int] = self._plan["alloc"]
        uniform: dict[str, int] = self._plan["uniform"]
        matrices = [s for s in matrices if s.kind == "linear" and s.name in uniform]
        total = sum(uniform[s.name] for s in matrices)
        curves = {}  # name -> (sorted item rates desc, cumulative bytes)
        gs = self._group_sizes()[-1]  # planning proxy under "auto": per-row grids
        for s, s2 in self._spectra(ctx, matrices):
            costs = self._costs(s.shape, gs)
            eps = gaussian_eps(s.shape[0], s.shape[1], self._widths(), gs)
            steps = hull_steps(costs, eps)
            if not steps:
                continue
            gains = torch.tensor([g for *_, g in steps], dtype=torch.float64)
            step_cost = torch.tensor([costs[b] - costs[a] for a, b, _ in steps], dtype=torch.float64)
            rate = (s2.double()[:, None] * gains[None, :]).reshape(-1)
            cost = step_cost.repeat(s2.numel())
            order = torch.argsort(rate, descending=True)
            curves[s.name] = (rate[order], torch.cumsum(cost[order], 0))
        if not curves:
            return
        lo = {s.name: max(self.min_bytes(s.shape), int(self.global_floor * uniform[s.name])) for s in matrices}
        hi = {s.name: max(lo[s.name], self.max_useful_bytes(s.shape)) for s in matrices}

        def split(lam: float) -> dict[str, int]:
            out = {}
            for s in matrices:
                want = uniform[s.name]
                if s.name in curves:
                    rate, csum = curves[s.name]
                    cnt = int((rate >= lam).sum())
                    want = int(csum[cnt - 1]) if cnt else 0
                out[s.name] = min(hi[s.name], max(lo[s.name], want))
            return out

        rmax = max(float(r[0]) for r, _ in curves.values() if r.numel())
        lo_l, hi_l = math.log(max(rmax, 1e-300)) - 80.0, math.log(max(rmax, 1e-300)) + 1.0  # bytes(λ) falls with λ
        for _ in range(60):
            mid = 0.5 * (lo_l + hi_l)
            if sum(split(math.exp(mid)).values()) > total:
                lo_l = mid
            else:
                hi_l = mid
        new = split(math.exp(hi_l))
        spent = sum(new.values())
        if spent > total:  # floors alone exceed the total: fall back to the uniform split
            log.warning("delta-come: global budget floors exceed the total; using the uniform split")
            return
        # the remainder (a fraction of one step per tensor) goes out in proportion, within the caps
        spare = total - spent
        room = {n: hi[n] - v for n, v in new.items()}
        rsum = sum(room.values())
        if rsum > 0:
            for n in new:
                new[n] += int(spare * room[n] / rsum)
        alloc.update(new)
        record = {n: {"bytes": v, "uniform": uniform[n]} for n, v in new.items()}
        ctx.cache.setdefault("delta_come", {})["global_budget"] = record
        moved = sum(abs(new[n] - uniform[n]) for n in new) / max(1, 2 * total)
        log.info("delta-come: global budget moved %.1f%% of the bytes between tensors", 100 * moved)

    def _spectra(self, ctx, matrices: list[TensorStat]):
        """(stat, σ² on CPU) per matrix; the next pair of tensors is read from disk while this one is on the device."""
        dev = ctx.device
        eig_cache = ctx.cache.setdefault("delta_come_eig", {})
        cache_left = eig_cache_budget()

        def load(s: TensorStat):
            f = ctx.finetuned.get(s.name)[: s.shape[0]].reshape(s.shape)
            b = ctx.base.get(s.name).reshape(s.shape)
            return f, b

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(load, matrices[0]) if matrices else None
            for i, s in enumerate(tqdm(matrices, desc="delta-come spectra", disable=not ctx.progress, leave=False)):
                f, b = fut.result()
                fut = pool.submit(load, matrices[i + 1]) if i + 1 < len(matrices) else None
                d = f.to(dev, torch.float32) - b.to(dev, torch.float32)
                side = min(s.shape)
                if cache_left >= side * side * 4:  # the eigenvectors fit: keep them for encode()
                    evals, evecs = gram_eigh(d)
                    eig_cache[s.name] = (evals.cpu(), evecs.cpu())
                    cache_left -= side * side * 4
                    yield s, evals.cpu()
                else:
                    yield s, singular_values2(d).cpu()

    # ---- work --------------------------------------------------------------------------------------------------
    def _hessian(self, job: TensorJob, ctx) -> torch.Tensor | None:
        """The job's input Hessian (mean over tokens) on the compute device. Tensors that read one input (q/k/v,
        gate/up) get the same device tensor: it is copied once per unit, and GPTQ's inverse is shared through it."""
        dev = job.delta.device
        if "hessian" in job.extras:
            src = job.extras["hessian"]
            return self._device_hessian(ctx, src, lambda: src.to(dev, torch.float32))
        state = getattr(ctx, "cache", {}).get("delta_come", {})
        if state.get("quantizer", self.quantizer) == "rtn":
            return None
        h = getattr(ctx, "cache", {}).get("hessians", {}).get(job.name)
        if h is None or h.H.shape[0] != job.shape[1]:
            return None
        # divide on the device: H can be 0.5 GB
        return self._device_hessian(ctx, h, lambda: h.H.to(dev, torch.float32) / max(1, h.n_tokens))

    @staticmethod
    def _device_hessian(ctx, src, make) -> torch.Tensor:
        cache = getattr(ctx, "cache", None)
        if cache is None:
            return make()
        kept: collections.OrderedDict = cache.setdefault(DEVICE_HESSIANS_KEY, collections.OrderedDict())
        entry = kept.get(id(src))
        if entry is None or entry["src"] is not src:
            entry = {"src": src, "H": make(), "prepared": {}}  # holding src keeps its id from being reused
            kept[id(src)] = entry
            while len(kept) > DEVICE_HESSIANS_KEPT:
                kept.popitem(last=False)
        kept.move_to_end(id(src))
        return entry["H"]

    def _prepared_hessian(self, ctx, H: torch.Tensor) -> PreparedHessian | None:
        """GPTQ's column order and inverse Hessian for the A factor (input side) under H, computed once per
        distinct H of the unit (q/k/v and gate/up share theirs)."""
        kept = getattr(ctx, "cache", {}).get(DEVICE_HESSIANS_KEY, {})
        for entry in kept.values():
            if entry["H"] is H:
                key = (self.percdamp, self.act_order)
                if key not in entry["prepared"]:
                    entry["prepared"][key] = prepare_hessian(H, percdamp=self.percdamp, act_order=self.act_order)
                return entry["prepared"][key]
        return None

    def _choose_bits(
        self, S, A0, Bt0, budget: int, shape, eps_cache: dict, kind: tuple
    ) -> tuple[int | None, torch.Tensor, dict]:
        """(group size, width per pair, record) with the lowest Σσ²ε among the candidate group sizes.

        ε(b) is measured on the first tensor of each (shape, kind) of the run and reused for the others: it describes
        the distribution of the singular vectors' entries, which tensors of one role share, and measuring it costs
        about as much as quantizing the tensor."""
        best = None
        for gs in self._group_sizes():
            costs = self._costs(shape, gs)
            key = (tuple(shape), kind, gs, self._widths())
            if key not in eps_cache:
                eps_cache[key] = measure_eps(A0, Bt0, self._widths(), gs)
            eps = eps_cache[key]
            if self.allocator == "paper":
                bits = allocate_paper(S.numel(), costs, budget)
            else:
                bits = allocate_optimal(S * S, costs, eps, budget)
            obj = allocation_objective(S * S, bits, eps)
            if best is None or obj < best[0]:
                best = (obj, gs, bits)
        obj, gs, bits = best
        rel = obj / max(float((S.double() ** 2).sum()), 1e-300)
        return gs, bits, {"objective": round(rel, 6)}

    def encode(self, job: TensorJob, ctx) -> Encoded:
        return self._encode(job, ctx, coded=False)

    def encode_coded(self, job: TensorJob, ctx) -> Encoded:
        """Fill the budget as stored on disk. Quantizing (GPTQ) is most of the cost, so the fit runs on a proxy: the
        bit widths chosen at a trial budget, RTN-quantized (whose codes have nearly the same statistics), entropy-
        coded for real; the stored budget that proxy settles on is then quantized once, for real. What remains (the
        proxy's error) is measured on the final parts and rolled over to the unit's next tensors like unspent bytes."""
        return self._encode(job, ctx, coded=self.entropy_stage)

    def _encode(self, job: TensorJob, ctx, coded: bool) -> Encoded:
        m, n = job.shape
        delta = job.delta.float()
        cheapest = self.min_bytes(job.shape)
        if job.budget_bytes < cheapest:
            raise BudgetError(
                f"{job.name}: budget of {job.budget_bytes} bytes is below one {min(self._widths())}-bit singular pair"
            )
        # pairs the SVD keeps: as many as the budget could buy, twice that when the entropy stage's saving may buy more
        k = min(m, n, (CODED_HEADROOM if coded else 1) * job.budget_bytes // cheapest)
        cache = getattr(ctx, "cache", {})
        dev = delta.device
        with _phase("encode.hessian", dev):
            H = self._hessian(job, ctx)
        eig = cache.get("delta_come_eig", {}).pop(job.name, None)
        whitened = self.svd == "whitened" and H is not None
        with _phase("encode.svd", dev):
            if whitened:
                # SVD of Δ·L with H + damp = L Lᵀ: the top pairs are the best rank-r fit of the OUTPUTS Δx on the
                # calibration inputs; A = √σ (L⁻ᵀ w)ᵀ maps x back
                Hd = H + self.percdamp * float(torch.diag(H).mean()) * torch.eye(n, device=H.device, dtype=H.dtype)
                L = torch.linalg.cholesky(Hd)
                U, S, W = gram_svd(delta @ L, k)
                A0 = S.sqrt()[:, None] * torch.linalg.solve_triangular(L.T, W, upper=True).T
            else:
                U, S, V = gram_svd(delta, k, eig)
                A0 = S.sqrt()[:, None] * V.T  # k x n
            Bt0 = S.sqrt()[:, None] * U.T  # k x m
        eps_cache = cache.setdefault("delta_come_eps", {})

        def widths(budget: int):
            with _phase("encode.allocate", dev):
                gs, bits, record = self._choose_bits(S, A0, Bt0, budget, job.shape, eps_cache, (job.kind, whitened))
            # rows grouped by width, widest first (within a width: descending σ)
            order = torch.argsort(-bits * (k + 1) + torch.arange(k), stable=True)
            bits = bits[order]
            r = int((bits > 0).sum())
            return gs, bits[:r], order[:r].to(dev), record

        budget = job.budget_bytes
        if coded:
            def proxy(b: int) -> Encoded:
                gs, bits, order, _ = widths(b)
                groups = [{"bits": w, "A": quantize_rows(A0[order][sl], w, gs), "Bt": quantize_rows(Bt0[order][sl], w, gs)}
                          for w, sl in _width_spans(bits)]
                return Encoded("factors", {"stored_budget": b}, build_factor_parts(groups)[1])

            most = k * max(self._costs(job.shape, g)[max(self._widths())] for g in self._group_sizes())
            # GPTQ's codes spread over the grid more than RTN's: on SmolLM2 fine-tunes they coded 2.5-4% larger
            # than the proxy's, so the proxy aims that much lower (what stays unspent rolls over in the unit)
            aim = max(cheapest, int(job.budget_bytes / (GPTQ_CODED_EXCESS if H is not None else RTN_CODED_EXCESS)))
            fitted = fit_coded_budget(proxy, aim, max(aim, most), self.coded_fit_rounds, dev, self.name)
            budget = fitted.params["stored_budget"]
        gs, bits, order, record = widths(budget)
        A0, Bt0 = A0[order], Bt0[order]

        groups = self._quantize(delta, A0, Bt0, bits, H, gs, ctx)
        params, parts = build_factor_parts(groups)
        params["quantizer"] = "gptq" if H is not None else "rtn"
        params["svd"] = "whitened" if whitened else "plain"
        params["budget"] = {"mode": self.budget, "bytes": int(job.budget_bytes)}
        params.update(record)
        enc = Encoded("factors", params, {key: v.cpu() for key, v in parts.items()})
        if enc.nbytes() > budget:  # cannot happen: the allocators count every stored byte
            raise BudgetError(f"{job.name}: stored {enc.nbytes()} bytes over a {budget}-byte budget")
        if coded:
            enc.coded_bytes = coded_nbytes(enc.parts)
        self._roll_over(job.name, job.budget_bytes - (enc.coded_bytes if coded else enc.nbytes()), ctx)
        return enc

    def _roll_over(self, name: str, unspent: int, ctx) -> None:
        """Give a tensor's unspent bytes (less than one singular pair's worth) to the tensors still to be encoded, in
        proportion to their budgets, so a run spends its budget rather than losing a fraction per tensor.

        Only within the current work unit: the driver encodes each unit (a decoder layer, an embedding, ...) from
        its own copy of the method and budgets, and slices name-keyed cache entries per unit, so the unit's members
        are the keys of the "delta_come:unit" entry prepare() put there. Bytes therefore flow only inside a unit,
        in its fixed encode order: the result stays a pure function of the plan and the unit."""
        alloc, done = self._plan.get("alloc"), self._plan.get("done")
        if alloc is None or name not in alloc:
            return
        done.add(name)
        members = getattr(ctx, "cache", {}).get(UNIT_KEY) or alloc
        rest = [n for n in members if n in alloc and n not in done]
        total = sum(alloc[n] for n in rest)
        # negative: the coded size passed the budget (encode_coded's proxy erred): the rest of the unit pays it back
        if unspent == 0 or total <= 0:
            return
        for n in rest:
            alloc[n] += unspent * alloc[n] // total

    def _quantize(
        self, delta, A0, Bt0, bits: torch.Tensor, H: torch.Tensor | None, gs: int | None, ctx=None
    ) -> list[dict]:
        """Quantized rank groups: A first (GPTQ over x, or RTN), then Bt refit to Δ given Â and quantized (GPTQ over
        z = Âx, or RTN)."""
        dev = delta.device
        r = bits.numel()
        if r == 0:
            return []
        bits_d = bits.to(dev)
        spans = _width_spans(bits)

        with _phase("encode.quantize_a", dev):
            if H is not None:
                prepared = self._prepared_hessian(ctx, H) if ctx is not None else None
                ra = gptq_quantize(A0, H, bits_d, group_size=gs, blocksize=self.blocksize, percdamp=self.percdamp,
                                   act_order=self.act_order, grid="row", prepared=prepared)
                qa = {w: ra.qmatrix(sl, w) for w, sl in spans}
                A_hat = ra.dequantized
            else:
                qa = {w: quantize_rows(A0[sl], w, gs) for w, sl in spans}
                A_hat = torch.cat([qa[w].dequantize().to(dev) for w, _ in spans], 0)

        B = Bt0.T  # m x r
        if self.refit:
            with _phase("encode.refit", dev):
                B = self._refit(delta, A_hat, H, fallback=B)
        with _phase("encode.quantize_b", dev):
            if H is not None:
                Hz = A_hat @ H @ A_hat.T
                # narrowest widths first: their error is then compensated by the wider columns quantized after them
                order = torch.argsort(bits_d, stable=True)
                rb = gptq_quantize(B, Hz, bits_d, group_size=gs, blocksize=self.blocksize, percdamp=self.percdamp,
                                   grid="col", order=order)
                qb = {w: rb.qmatrix(sl, w) for w, sl in spans}
            else:
                Bt = B.T
                qb = {w: quantize_rows(Bt[sl].contiguous(), w, gs) for w, sl in spans}
        return [{"bits": w, "A": _cpu(qa[w]), "Bt": _cpu(qb[w])} for w, _ in spans]

    def _refit(self, delta, A_hat, H, fallback):
        """B' = argmin ‖(Δ − B Â) X‖ = Δ H Âᵀ (Â H Âᵀ)⁻¹ (H = I without calibration), lightly damped."""
        if H is None:
            rhs = delta @ A_hat.T  # m x r
            G = A_hat @ A_hat.T
        else:
            # GPTQ's damping here too: with fewer calibration tokens than input dims H is singular, and the undamped
            # fit would be free to do anything off the calibration inputs' span
            H = H + self.percdamp * float(torch.diag(H).mean()) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
            HA = H @ A_hat.T  # n x r
            rhs = delta @ HA
            G = A_hat @ HA
        damp = 1e-4 * float(torch.diag(G).mean()) + 1e-30
        G = G + damp * torch.eye(G.shape[0], device=G.device, dtype=G.dtype)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            log.debug("refit Gram matrix not positive definite; keeping the unrefit factor")
            return fallback
        return torch.cholesky_solve(rhs.T, L).T


def _width_spans(bits: torch.Tensor) -> list[tuple[int, slice]]:
    """(width, rows) of each run of equal widths in `bits` (sorted widest first)."""
    spans, i = [], 0
    for w in torch.unique_consecutive(bits).tolist():
        c = int((bits == w).sum())
        spans.append((int(w), slice(i, i + c)))
        i += c
    return spans


def _cpu(q: QMatrix) -> QMatrix:
    return QMatrix(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(), q.bits, q.cols, q.group_size)

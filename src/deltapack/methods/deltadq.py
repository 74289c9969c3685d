"""deltadq: group-wise dropout + separate quantization (Jiang et al. 2024, "DeltaDQ", arXiv:2410.08666).

Our reading of the paper (only the abstract could be read; docs/methods/deltadq.md has the full account):

* Group-wise dropout. Each row of Δ (out x in) is cut into contiguous groups of g columns; exactly `keep` elements
  survive in every group, at positions regenerated from a seed derived from the tensor's name
  (deltapack.format.masks.group_keep_indices: no positions are stored), and survivors are rescaled by g / keep so
  every group's expected contribution to y = Δx is unchanged. To follow the byte budget one row at a time, the first
  `rows_hi` rows keep `keep + 1` per group (see format/codec_deltadq.py).
* Group size g ("optimal group size"): chosen per tensor by a search that minimises the layer-output error
  ‖X(Δ − Δ̂)ᵀ‖² = tr(E H Eᵀ), H = XᵀX/t the input second moment of that linear on calibration text (collected with
  deltapack.calib.activations, from the fine-tuned model), over the divisors of the input width that leave at least
  one survivor per group. Data-free (no tokenizer, `calibrate=false`, embeddings): a fixed g (`default_group_size`,
  nearest divisor of the width), the best on average in bench/deltadq_study.py.
* Separate quantization (knob `split_bits` = s): survivors are quantized uniformly to k bits, the codes split by value
  range into 2^s parts; each part stores k − s low bits on its own re-fitted grid. With seeded masks, the part of each
  value is not implied by its position, so the part ids cost s bits per value: k bits in all, the same as plain
  k-bit codes. We implement it (so it can be measured: bench/deltadq_study.py) and default to s = 0. The paper's
  savings come from counting only the k − s value bits.
* k (`bits`, default 4 as in DARE) is fixed; the kept fraction follows the byte budget. Where 4-bit values would
  keep under `min_keep` (1/32) of the elements (about 128x), fewer bits (down to 2) keep more of them.
  `bits="auto"` picks k per tensor among {1, 2, 3, 4, 8} by the same layer-output error; the study found that
  error-driven choice worse end to end (it favours 1-2 bits with many survivors, whose structured error the network
  tolerates less than the random error of dropping more), so it is not the default. The grid (`scale`: one per
  tensor or one per row) is chosen per tensor by that error (on a sample of `search_rows` rows).
* Budget: the same bits per element everywhere (`allocation="uniform"`), or `"energy"`: bytes ∝ sqrt(numel·‖Δ‖²),
  which minimises Σ‖Δ − Δ̂‖² when a tensor's error is ‖Δ‖²/q (q = kept fraction).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field

from deltapack.errors import BudgetError, DeltapackError
from deltapack.format import codec_deltadq as dq  # noqa: F401  (registers the "deltadq" codec)
from deltapack.format.masks import seed_for
from deltapack.methods.base import (DeltaMethod, Encoded, TensorJob, fit_coded_budget, proportional_allocation,
                                    register_method)

log = logging.getLogger(__name__)

AUTO_BITS = (1, 2, 3, 4, 8)
HESSIAN_KEY = "deltadq:hessians"
CHOICES_KEY = "deltadq:choices"


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def feasible_group_sizes(m: int, n: int, n_values: int) -> list[int]:
    """Divisors g of n (g ≥ 2) for which every group keeps at least one survivor; [n] when none does."""
    ok = [g for g in divisors(n) if g >= 2 and n_values // (n // g) >= m]
    return ok or [n]


def nearest_group_size(target: int, feasible: list[int]) -> int:
    """The feasible g nearest to `target` on a log scale (ties: the larger)."""
    return min(feasible, key=lambda g: (abs(math.log(g / target)), -g))


def spread(cands: list[int], most: int) -> list[int]:
    """At most `most` log-spaced elements of a sorted list, ends included."""
    if len(cands) <= most:
        return cands
    idx = sorted({round(i * (len(cands) - 1) / (most - 1)) for i in range(most)})
    return [cands[i] for i in idx]


def output_error(delta: torch.Tensor, approx: torch.Tensor, H: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) with E = Δ − Δ̂ (the layer-output error per calibration token); ‖E‖² when H is None."""
    E = delta - approx
    if H is None:
        return float((E * E).sum())
    return float(((E @ H) * E).sum())


@dataclass
class Trial:
    g: int
    bits: int
    scale: str
    n_values: int
    error: float
    params: dict = field(repr=False)
    parts: dict = field(repr=False)


def trial(delta: torch.Tensor, H, *, g: int, n_values: int, seed: int, bits: int, s: int, scale: str,
          hashes: dq.MaskHashes | None = None) -> Trial:
    """Encode with these settings, decode the stored values, measure the error."""
    shape = tuple(delta.shape)
    params, parts, pos = dq.encode(delta, g=g, n_values=n_values, seed=seed, bits=bits, s=s, scale=scale, hashes=hashes)
    approx = dq.scatter_values(dq.decode_values(params, parts, shape), params, shape, pos)
    return Trial(g, bits, scale, n_values, output_error(delta, approx, H), params, parts)


def search_group_size(delta: torch.Tensor, H: torch.Tensor | None, candidates: list[int], *, n_values: int, seed: int,
                      bits: int, s: int, scale: str, hashes: dq.MaskHashes | None = None) -> tuple[Trial, dict[int, float]]:
    """The candidate g with the lowest error on this calibration statistic, and every candidate's error."""
    hashes = hashes or dq.MaskHashes(tuple(delta.shape), seed, delta.device)
    trials = [trial(delta, H, g=g, n_values=n_values, seed=seed, bits=bits, s=s, scale=scale, hashes=hashes)
              for g in candidates]
    best = min(trials, key=lambda t: (t.error, t.g))
    return best, {t.g: t.error for t in trials}


@register_method
class DeltaDQ(DeltaMethod):
    name = "deltadq"
    paper = ("Jiang et al. 2024, DeltaDQ: Ultra-High Delta Compression for Fine-Tuned LLMs via Group-wise Dropout "
             "and Separate Quantization (arXiv:2410.08666)")
    summary = "group-wise dropout (seeded, free positions; group size searched on layer outputs) + k-bit values"
    uses_calibration = True
    needs_calibration = False
    parts_per_tensor = 2
    # compress's metadata estimate per tensor is len(name)*(1+parts) + 420 + 90*parts + params_bytes, plus 3000 + aux
    # per directory. Measured on deltadq deltas: ~530 bytes per tensor all told (params ~75, other manifest fields
    # ~250, ~100 of safetensors header per part) and ~1600 per directory, so the estimate runs ~200 bytes per tensor
    # high; credited here, or 128x on an 8M-parameter model lands ~5% above its target (lead: fix in compress).
    params_bytes: ClassVar[int] = -200

    group_size: int | None = Field(None, ge=2, description="paper's g, fixed for every tensor (default: searched)")
    default_group_size: int = Field(32, ge=2, description="data-free g (nearest divisor of the input width)")
    group_sizes: list[int] | None = Field(None, description="candidate g for the search (default: divisors)")
    max_candidates: int = Field(8, ge=1, description="most g tried per tensor")
    bits: int | Literal["auto"] = Field(4, description="paper's k, bits per kept value: 1-8, 16 (bf16) or auto")
    split_bits: int = Field(0, ge=0, le=7, description="paper's s: 2^s value-range parts of k-s bits (+ s-bit ids)")
    min_keep: float = Field(1 / 32, ge=0, le=1, description=(
        "when k-bit values would keep fewer than this share of the elements, use fewer bits (down to 2) to keep more"))
    drop_rate: float | None = Field(None, ge=0, lt=1, description="paper's p, fixed (default: from --ratio)")
    scale: Literal["auto", "tensor", "row"] = Field("auto", description="quantization grid per tensor or per row")
    allocation: Literal["uniform", "energy"] = Field("uniform", description="byte budget across tensors")
    calibrate: bool = Field(True, description="search g (and k, grid) on layer outputs of calibration text")
    calib_source: Literal["text", "random"] = Field(
        "text", description="text: --calib / default corpus (needs a tokenizer); random: seeded random token ids"
    )
    calib_seqs: int = Field(16, ge=1)
    calib_seq_len: int = Field(256, ge=8)
    search_rows: int = Field(128, ge=1, description="rows sampled to choose bits and grid (errors add over rows)")
    seed: int = Field(0, description="salt for the per-tensor mask seeds")

    def model_post_init(self, _):
        if self.bits != "auto" and self.bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError("bits must be 1-8, 16 or auto")
        if self.split_bits and self.bits != "auto" and not self.split_bits < self.bits <= 8:
            raise ValueError("split_bits must be below bits (and bits at most 8)")
        if self.drop_rate is not None and self.bits == "auto":
            raise ValueError("a fixed drop_rate needs fixed bits")

    # ---- planning ------------------------------------------------------------------------------------------------
    def _bit_candidates(self, m: int | None = None, n: int | None = None, budget: int | None = None) -> list[int]:
        if self.bits == "auto":
            return [b for b in AUTO_BITS if b > self.split_bits]
        bits = self.bits
        if m is None or self.drop_rate is not None or not 2 < bits <= 8:
            return [bits]
        # too few survivors hurt more than coarser values (bench/deltadq_study.py, E3): fewer bits, more survivors
        while bits > max(2, self.split_bits + 1):
            if self._n_values(m, n, budget, bits, "tensor") >= self.min_keep * m * n:
                break
            bits -= 1
        return [bits]

    def _scale_candidates(self) -> list[str]:
        return ["tensor", "row"] if self.scale == "auto" else [self.scale]

    def _s(self, bits: int) -> int:
        return self.split_bits if bits < 16 else 0

    def min_bytes(self, shape):
        m, _ = shape
        b = min(self._bit_candidates())
        return dq.stored_bytes(m, m, b, self._s(b), "tensor") + 8

    def max_useful_bytes(self, shape):
        m, n = shape
        b = max(self._bit_candidates())
        return dq.stored_bytes(m, m * n, b, self._s(b), "row")

    def allocate(self, stats, total_bytes):
        if self.allocation == "uniform":
            return super().allocate(stats, total_bytes)
        # error of a tensor ≈ ‖Δ‖²/q; minimising the sum under Σ numel·q = const gives q ∝ rms(Δ)
        return proportional_allocation(
            stats, total_bytes, self.min_bytes, self.max_useful_bytes,
            weight=lambda s: math.sqrt(s.shape[0] * s.shape[1] * max(s.sq_norm, 0.0)) or 1e-30,
        )

    # ---- calibration ---------------------------------------------------------------------------------------------
    def _wants_search(self) -> bool:
        return self.group_size is None or self.bits == "auto" or self.scale == "auto"

    def prepare(self, ctx, matrices) -> None:
        """Input second moments H of every linear, from the fine-tuned model on calibration tokens. Falls back to the
        data-free choices (with a warning) when the model cannot be calibrated."""
        if not (self.calibrate and self._wants_search()):
            return
        try:
            from deltapack.calib.activations import (CalibrationError, calibration_tokens, collect_hessians,
                                                     has_tokenizer, hessian_device_budget)
        except ImportError:  # pragma: no cover - the calibration module is optional
            log.warning("deltadq: deltapack.calib.activations not available; using data-free group sizes")
            return
        if self.calib_source == "text" and not has_tokenizer(ctx.finetuned):
            log.warning("deltadq: %s has no tokenizer, so no calibration text: data-free group sizes "
                        "(-p calib_source=random calibrates on random token ids; -p calibrate=false silences this)",
                        ctx.finetuned.ref)
            return
        try:
            ids, record = calibration_tokens(ctx, self.calib_seqs, self.calib_seq_len, source=self.calib_source)
            hess = collect_hessians(ctx.finetuned, ids, ctx.device, progress=ctx.progress,
                                    device_budget=hessian_device_budget(ctx))
        except CalibrationError as e:
            log.warning("deltadq: no calibration (%s); using data-free group sizes", e)
            return
        wanted = {s.name for s in matrices}
        ctx.cache[HESSIAN_KEY] = {n: h for n, h in hess.items() if n in wanted}
        record = dict(record, method="deltadq", layers=len(ctx.cache[HESSIAN_KEY]))
        ctx.cache["calibration_record"] = record

    # ---- work ----------------------------------------------------------------------------------------------------
    def _n_values(self, m: int, n: int, budget: int, bits: int, scale: str) -> int:
        if self.drop_rate is not None:
            return max(1, round((1 - self.drop_rate) * m * n))
        return min(m * n, dq.values_for_budget(m, budget, bits, self._s(bits), scale))

    def encode(self, job: TensorJob, ctx) -> Encoded:
        m, n = job.shape
        delta = job.delta.float()
        dev = delta.device
        seed = seed_for(job.name, self.seed)
        hess = (ctx.cache.get(HESSIAN_KEY) or {}).get(job.name) if ctx is not None else None
        H = hess.mean().to(dev, torch.float32) if hess is not None else None
        if H is not None and H.shape != (n, n):
            H = None  # e.g. a vocabulary-grown tensor whose codec covers only part of it
        hashes = dq.MaskHashes((m, n), seed, dev)

        # 1. bits and grid at the data-free group size, judged on a seeded sample of rows (errors add up over rows)
        options = []
        for bits in self._bit_candidates(m, n, job.budget_bytes):
            for scale in self._scale_candidates():
                nv = self._n_values(m, n, job.budget_bytes, bits, scale)
                if nv >= 1:
                    options.append((bits, scale, nv))
        if not options:
            raise BudgetError(f"{job.name}: a budget of {job.budget_bytes} bytes keeps no element")
        best_opt = options[0]
        if len(options) > 1:
            if m > self.search_rows:
                gen = torch.Generator().manual_seed(seed)
                rows = torch.randperm(m, generator=gen)[: self.search_rows].sort().values.to(dev)
                sample = delta[rows]
                sample_hashes = dq.MaskHashes(tuple(sample.shape), seed, dev)
            else:
                sample, sample_hashes = delta, hashes
            r = sample.shape[0]
            best_err = None
            for bits, scale, nv in options:
                g = self._default_g(m, n, nv, job.name)
                nv_r = nv if r == m else max(1, nv * r // m)
                t = trial(sample, H, g=g, n_values=nv_r, seed=seed, bits=bits, s=self._s(bits), scale=scale,
                          hashes=sample_hashes)
                if best_err is None or t.error < best_err:
                    best_opt, best_err = (bits, scale, nv), t.error
        bits, scale, nv = best_opt
        g0 = self._default_g(m, n, nv, job.name)
        s = self._s(bits)

        # 2. group size, on the layer outputs of the calibration data (the whole matrix: the stored mask is judged)
        errors: dict[int, float] = {}
        if H is not None and self.group_size is None:
            cands = self.group_sizes or spread(feasible_group_sizes(m, n, nv), self.max_candidates)
            cands = sorted({g for g in cands if g >= 2 and n % g == 0} | {g0})
            best, errors = search_group_size(delta, H, cands, n_values=nv, seed=seed, bits=bits, s=s, scale=scale,
                                             hashes=hashes)
        else:
            best = trial(delta, H, g=g0, n_values=nv, seed=seed, bits=bits, s=s, scale=scale, hashes=hashes)
            errors = {g0: best.error}
        if best.params["keep"] == 0:
            log.warning("%s: group size %d keeps no element in %d of %d rows at this budget", job.name, best.g,
                        m - best.params["rows_hi"], m)
        if ctx is not None:  # what was chosen and why, for benchmarks (not stored)
            ref = output_error(delta, torch.zeros_like(delta), H)
            kept = dq.kept_count(m, n, best.g, best.params["keep"], best.params["rows_hi"]) / (m * n)
            ctx.cache.setdefault(CHOICES_KEY, {})[job.name] = {
                "g": best.g, "bits": bits, "scale": scale, "kept": kept, "calibrated": H is not None,
                "rel_error": best.error / ref if ref > 0 else 0.0,
                "errors": {g: e / ref if ref > 0 else 0.0 for g, e in errors.items()},
            }
        return Encoded("deltadq", best.params, {k: v.cpu() for k, v in best.parts.items()})

    # its re-encodes skip the search (a mask + quantize each), and its coded fraction is convex in the budget (the
    # fit's secant lands above twice, then bisects): 5 rounds instead of 3
    coded_fit_rounds: ClassVar[int] = 5

    def encode_coded(self, job: TensorJob, ctx) -> Encoded:
        """Fill the budget as stored on disk: the search (bits, grid, group size) runs once at the nominal budget;
        the bigger budgets the entropy stage's saving pays for keep those settings and only keep more values (one
        encode each, no search)."""
        if self.drop_rate is not None:
            return self.encode(job, ctx)  # a fixed drop rate: the budget changes nothing
        first = self.encode(job, ctx)
        m, n = job.shape
        p = first.params
        g, bits, s, scale = int(p["g"]), int(p["bits"]), int(p.get("s", 0)), p["scale"]
        delta = job.delta.float()
        hashes = dq.MaskHashes((m, n), int(p["seed"]), delta.device)

        # a budget that keeps every value at `bits` buys precision instead, up to 8 bits (a small delta whose codes
        # zstd shrinks; on the demo pair the ~12% overshoot was mostly the fit's stall, see base.fit_coded_budget)
        top = 8 if self.bits != "auto" and 0 < bits < 8 else bits

        def bits_for(budget: int) -> int:
            b = bits
            while b < top and self._n_values(m, n, budget, b + 1, scale) >= m * n:
                b += 1
            return b

        def at(budget: int) -> Encoded:
            if budget == job.budget_bytes:
                return first
            b = bits_for(budget)
            nv = self._n_values(m, n, budget, b, scale)
            params, parts, _ = dq.encode(delta, g=g, n_values=nv, seed=int(p["seed"]), bits=b, s=s, scale=scale,
                                         hashes=hashes)
            return Encoded("deltadq", params, {k: v.cpu() for k, v in parts.items()})

        most = max(job.budget_bytes, dq.stored_bytes(m, m * n, top, s, scale))
        return fit_coded_budget(at, job.budget_bytes, most, self.coded_fit_rounds, delta.device, self.name)

    def _default_g(self, m: int, n: int, n_values: int, name: str) -> int:
        if self.group_size is not None:
            if n % self.group_size:
                raise DeltapackError(f"{name}: group size {self.group_size} does not divide the input width {n}")
            return self.group_size
        return nearest_group_size(self.default_group_size, feasible_group_sizes(m, n, n_values))

"""The method interface and registry.

One method = one pydantic class whose fields are its knobs (named as in its paper), with class-level facts: its name,
its paper, whether it needs / can use calibration data. The compress driver plans a byte budget per tensor
(`allocate`), then calls `encode` tensor by tensor; `refine` is an optional whole-model pass (e.g. BitDelta's scale
distillation) run before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from deltapack.errors import MethodError

if TYPE_CHECKING:
    from deltapack.compress import CompressContext

log = logging.getLogger(__name__)

# A coded-size fit stops once the parts, entropy-coded, fill at least this share of the budget: closer costs another
# encode for well under 1% of the bytes.
CODED_FIT_TOLERANCE = 0.005


# The codec name of an encoding that is not final: several candidate encodings of one tensor, carried through the
# unit files to the method's `refine` pass, which replaces every one of them (auto picks among them there). The
# assembler refuses to write one.
PENDING_CODEC = "pending"


@dataclass
class Encoded:
    """A compressed tensor as the codec stores it."""

    codec: str
    params: dict
    parts: dict[str, torch.Tensor]
    method: str | None = None  # set when a tensor is stored by another method than the run's (dense fallback)
    coded_bytes: int | None = None  # the parts' size after the entropy stage, when a coded-size fit measured it

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def coded_nbytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes these parts take on disk after the write-time entropy stage (format/entropy.py `encode_parts`, the very
    function the writer calls), zstd run for real: the codes' statistics decide it, not their width."""
    from deltapack.compress import phase
    from deltapack.format.entropy import encode_parts

    with phase("encode.zstd"):  # CPU work: what the fits' exact sizes cost (7B timing records it)
        return sum(t.numel() * t.element_size() for t in encode_parts(parts)[0].values())


def fit_coded_budget(encode: Callable[[int], Encoded], budget: int, max_budget: int, rounds: int,
                     device: torch.device | None = None, label: str | None = None) -> Encoded:
    """Encode so that the parts AFTER the entropy stage fill `budget` bytes without passing it. `encode(b)` encodes
    at a budget of b stored (pre-entropy) bytes; `rounds` re-encodes at most. The first trial scales b by
    budget / coded; once one overshoots (the coded fraction grows with the budget: on real deltas dare's went from
    0.67 to 0.70 between 1x and 1.4x), the next ones interpolate inside the bracket [fits, overshoots]. Stops within
    CODED_FIT_TOLERANCE. An encoding whose coded size passes the budget is never returned. `max_budget`: stored
    bytes past which more buy nothing (max_useful_bytes). Timed as the phase `encode.coded_fit` (`device`: the one its
    encodes run on, synchronised at the phase edges) and, with a `label` (the method's name), also as
    `encode.coded_fit.<label>`: under auto, which fits every candidate, the sum alone cannot say whose fit it is."""
    from contextlib import nullcontext

    from deltapack.compress import phase

    with phase("encode.coded_fit", device), (phase(f"encode.coded_fit.{label}") if label else nullcontext()):
        return _fit_coded(encode, budget, max_budget, rounds)


def _fit_coded(encode: Callable[[int], Encoded], budget: int, max_budget: int, rounds: int) -> Encoded:
    lo_b, enc = budget, encode(budget)
    enc.coded_bytes = coded_nbytes(enc.parts)
    hi: tuple[int, int] | None = None  # (stored budget, coded bytes) of the smallest overshoot
    overshoots_in_a_row = 0
    for _ in range(rounds):
        c = enc.coded_bytes
        if c <= 0 or c >= budget * (1 - CODED_FIT_TOLERANCE) or lo_b >= max_budget:
            break
        if hi is None:
            nb = min(max_budget, int(lo_b * budget / c))
        elif overshoots_in_a_row >= 2:
            # the coded fraction is convex in the budget (deltadq's went 0.695 -> 0.73 between keep 17 and 24 of 72),
            # so the secant keeps landing above; halve the bracket instead (regula falsi's stall on one side)
            nb = (lo_b + hi[0]) // 2
        else:
            nb = min(hi[0] - 1, lo_b + int((hi[0] - lo_b) * (budget - c) / max(1, hi[1] - c)))
        if nb <= lo_b:
            break
        trial = encode(nb)
        if trial.nbytes() == enc.nbytes() and trial.parts.keys() == enc.parts.keys():
            break  # the budget does not move this encoding (a fixed knob, whole planes)
        trial.coded_bytes = coded_nbytes(trial.parts)
        if trial.coded_bytes <= budget:
            lo_b, enc = nb, trial
            overshoots_in_a_row = 0
        else:
            # strictly below the overshoot's stored size next: a coarse method (one rank) then steps down a unit
            hi = (min(nb, trial.nbytes()), trial.coded_bytes)
            overshoots_in_a_row += 1
    return enc


@dataclass
class TensorJob:
    """What a method sees for one tensor."""

    name: str
    shape: tuple[int, int]  # 2-D view (out, in) of the part the codec covers (base rows only under vocab growth)
    delta: torch.Tensor  # fp32, 2-D, on the compute device
    budget_bytes: int  # bytes this tensor may store
    kind: str  # "linear" | "embedding" | "lm_head" | "vector" | "other"
    base: torch.Tensor | None = None  # 2-D views, on device (raw needs them for exactness checks)
    finetuned: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorStat:
    """Per-tensor facts gathered in the planning pass, for budget allocation."""

    name: str
    shape: tuple[int, int]
    kind: str
    dense_bytes: int
    sq_norm: float  # ||delta||_F^2
    extras: dict[str, Any] = field(default_factory=dict)


class DeltaMethod(BaseModel):
    """Base class. Subclasses set the ClassVars and implement `encode` (and `min_bytes` when not 1 bit/element)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False  # cannot run without calibration data
    uses_calibration: ClassVar[bool] = False  # improves with calibration data (collected only when true)
    lossless: ClassVar[bool] = False  # ignores --ratio (lossless, raw)
    entropy_stage: ClassVar[bool] = True  # stored parts zstd-coded where that saves >= 5% (compress/assemble.py)
    parts_per_tensor: ClassVar[int] = 3  # for the metadata estimate
    coded_fit_rounds: ClassVar[int] = 3  # re-encodes encode_coded may spend to fill the budget after entropy coding

    # ---- planning ------------------------------------------------------------------------------------------------
    def min_bytes(self, shape: tuple[int, int]) -> int:
        """Fewest bytes this method can store a tensor of this shape in."""
        return 1

    def max_useful_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes past which more budget buys nothing (e.g. full rank). Default: the bf16 dense size."""
        return shape[0] * shape[1] * 2

    def allocate(self, stats: list[TensorStat], total_bytes: int) -> dict[str, int]:
        """Split `total_bytes` over matrices. Default: the same bits per element everywhere, each tensor clamped to
        [min_bytes, max_useful_bytes] with the surplus redistributed."""
        return proportional_allocation(stats, total_bytes, self.min_bytes, self.max_useful_bytes)

    # ---- work --------------------------------------------------------------------------------------------------
    def encode(self, job: TensorJob, ctx: "CompressContext") -> Encoded:
        raise NotImplementedError

    def encode_coded(self, job: TensorJob, ctx: "CompressContext") -> Encoded:
        """Encode to `job.budget_bytes` bytes as stored on disk, i.e. after the entropy stage (what the driver and
        auto call). Budgets are planned against the true ratio, and zstd shrinks codes by 0-40% depending on the
        method and the delta (bench/results/ratio_exact_cpu.json), so the entropy stage's saving is spent here on a
        bigger stored budget instead of ending up as a file smaller than asked. Default: re-encode at a scaled
        budget up to `coded_fit_rounds` times (fit_coded_budget); methods whose encode is costly override this to
        re-spend more cheaply (deltadq keeps its searched settings, lowrank its SVD, delta-come sizes with RTN)."""
        return self.fit_coded(job, lambda b: self.encode(dataclasses.replace(job, budget_bytes=b), ctx))

    def fit_coded(self, job: TensorJob, encode_at: Callable[[int], Encoded]) -> Encoded:
        """`encode_at(b)` (this tensor at a stored budget of b bytes) fitted to the job's budget after the entropy
        stage, up to the method's useful size; one encode at the nominal budget when the method has no entropy
        stage or no fit rounds. For overrides of `encode_coded` that only change how one budget is encoded."""
        if not self.entropy_stage or self.coded_fit_rounds < 1:
            return encode_at(job.budget_bytes)
        return fit_coded_budget(encode_at, job.budget_bytes, max(job.budget_bytes, self.max_useful_bytes(job.shape)),
                                self.coded_fit_rounds, job.delta.device, self.name)

    def refine(self, encoded: dict[str, Encoded], ctx: "CompressContext") -> dict[str, Encoded]:
        """Optional whole-model pass over all encoded tensors before writing."""
        return encoded

    @property
    def has_refine(self) -> bool:
        return type(self).refine is not DeltaMethod.refine

    def describe_params(self) -> dict:
        return self.model_dump()


def proportional_allocation(stats, total_bytes, min_bytes, max_bytes, weight=None) -> dict[str, int]:
    """Water-filling: bytes ∝ weight (default: element count) within [min, max] per tensor."""
    weight = weight or (lambda s: float(s.shape[0] * s.shape[1]))
    lo = {s.name: min_bytes(s.shape) for s in stats}
    hi = {s.name: max(lo[s.name], max_bytes(s.shape)) for s in stats}
    alloc: dict[str, int] = {}
    free = list(stats)
    remaining = total_bytes
    for _ in range(len(stats) + 1):
        wsum = sum(weight(s) for s in free)
        if not free or wsum <= 0:
            break
        # clamp tensors over their maximum first (that frees budget for the rest), then those under their minimum
        over = [s for s in free if remaining * weight(s) / wsum > hi[s.name]]
        under = [] if over else [s for s in free if remaining * weight(s) / wsum < lo[s.name]]
        for s in over or under:
            alloc[s.name] = hi[s.name] if over else lo[s.name]
            remaining -= alloc[s.name]
            free.remove(s)
        if not (over or under):
            for s in free:
                alloc[s.name] = int(remaining * weight(s) / wsum)
            free = []
            break
    for s in free:
        alloc[s.name] = lo[s.name]
    return alloc


METHODS: dict[str, type[DeltaMethod]] = {}


def register_method(cls: type[DeltaMethod]) -> type[DeltaMethod]:
    if not cls.name:
        raise ValueError("method class needs a name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, params: dict | None = None) -> DeltaMethod:
    from deltapack import methods as _  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**(params or {}))
    except ValidationError as e:
        first = e.errors()[0]
        raise MethodError(f"bad parameter for {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from e


def method_table() -> list[dict]:
    """Name, paper, calibration flags and knobs (with defaults) of every registered method."""
    from deltapack import methods as _  # noqa: F401

    rows = []
    for name, cls in sorted(METHODS.items()):
        # a knob with a default_factory has no plain default: build it, so the listing shows the real value
        knobs = {k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()}
        rows.append(
            {
                "name": name,
                "paper": cls.paper,
                "summary": cls.summary,
                "needs_calibration": cls.needs_calibration,
                "uses_calibration": cls.uses_calibration,
                "knobs": knobs,
            }
        )
    return rows

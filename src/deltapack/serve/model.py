"""The base model with delta-aware layers: one forward for a whole mixed-tenant batch.

Every nn.Linear, the input embedding, the output head and every norm of the base model are wrapped. A wrapper runs
the base module once for all tokens, then adds, through the kernel backend, the delta of each token's tenant read
from the packed (compressed) layout:

    linear     y = base(x) + kernels.linear(x, tokens, W-deltas) + kernels.vector(tokens, bias-deltas)
    embedding  y = base(ids) + kernels.rows(ids, tokens, deltas)
    norm       y = base(x) + dw_t * (f(1) - f(0))   (f = the norm with its weight set to 1 / 0: the normalised input,
                                                     for any norm whose output is elementwise affine in its weight)

Which tenant a token belongs to comes from the per-forward `BatchContext` (tenant slot per batch row) that the
engine sets around `ModelRunner.forward`. Vocabulary growth: the head's output gains the widest resident tenant's
added rows (other rows see -inf there); embedding lookups of added ids take the tenant's own rows.

Numerics: everything runs in the model dtype. The server computes base(x) + delta(x), the merged model
(base + delta) x; in float32 they agree to rounding, in bf16 to bf16 rounding of the sum.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deltapack.errors import InputError
from deltapack.kernels import DeltaKernels, LayerDeltas, TokenSlots, get_kernels
from deltapack.kernels.schedule import CostModel, Scratch, scheduled_linear

log = logging.getLogger(__name__)


class BatchContext:
    """Tenant slot of every row of the batch being run (-1 = base model)."""

    def __init__(self, row_slots: list[int], device: torch.device):
        self.row_slots = list(row_slots)
        self.device = device
        self.any = any(s >= 0 for s in self.row_slots)
        self._tokens: dict[int, TokenSlots] = {}
        # a MergedEntry (deltapack.serve.merged) when every live row is its tenant's: the linear layers run on its
        # merged weights and read no weight delta. The engine sets it only for such batches.
        self.merged = None

    def tokens(self, num_tokens: int) -> TokenSlots:
        """Token slots for a (B, L) block flattened row-major (L = num_tokens / B)."""
        ts = self._tokens.get(num_tokens)
        if ts is None:
            B = len(self.row_slots)
            if num_tokens % B:
                raise RuntimeError(f"{num_tokens} tokens do not split over {B} batch rows")
            ts = TokenSlots.from_rows(self.row_slots, num_tokens // B, self.device)
            self._tokens[num_tokens] = ts
        return ts


@dataclass
class DeltaState:
    """Shared by every wrapper: the kernel backend, the resident deltas per weight, the current batch."""

    kernels: DeltaKernels
    layers: dict[str, LayerDeltas] = field(default_factory=dict)
    ctx: BatchContext | None = None
    # measured kernel-vs-dense costs (deltapack.kernels.schedule, calibrated at warm-up): None = the kernels always
    costs: CostModel | None = None
    scratch: Scratch = field(default_factory=Scratch)

    def layer(self, key: str) -> LayerDeltas | None:
        lay = self.layers.get(key)
        return lay if lay is not None and lay.count else None


@dataclass
class Site:
    """A place a delta tensor can go: one parameter of one wrapped module."""

    key: str  # "<module>.weight" / "<module>.bias", the checkpoint tensor name
    kind: str  # "linear" | "embedding" | "norm"
    role: str  # "weight" | "bias"
    shape: tuple[int, ...]
    present: bool  # the base module has this parameter (a bias may be absent)


class _Wrapped(nn.Module):
    def __init__(self, base: nn.Module, name: str, state: DeltaState):
        super().__init__()
        self.base = base
        self.wkey = f"{name}.weight"
        self.bkey = f"{name}.bias"
        object.__setattr__(self, "_state", state)  # not a submodule

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def _active(self):
        """(state, weight deltas, bias deltas) when this batch has any delta for this module, else None."""
        st: DeltaState = self._state
        if st.ctx is None or not st.ctx.any:
            return None
        wl, bl = st.layer(self.wkey), st.layer(self.bkey)
        if wl is None and bl is None:
            return None
        return st, wl, bl


class DeltaLinear(_Wrapped):
    def _merged_weight(self) -> torch.Tensor | None:
        """This forward's merged weight for this layer (base + the tenant's delta), when the batch runs on a merged
        copy built from the delta now in the tenant's slot; else None."""
        st: DeltaState = self._state
        entry = getattr(st.ctx, "merged", None)
        if entry is None:
            return None
        wl = st.layers.get(self.wkey)
        return entry.weight(self.wkey, wl.get(entry.slot) if wl is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self._merged_weight()
        y = self.base(x) if merged is None else nn.functional.linear(x, merged, self.base.bias)
        active = self._active()
        if active is None:
            return y
        st, wl, bl = active
        if merged is not None:
            wl = wl if wl is not None and wl.max_extra_rows else None  # the weight delta is in `merged` already
            if wl is None and bl is None:
                return y
        lead = x.shape[:-1]
        T = math.prod(lead)
        x2, y2 = x.reshape(T, x.shape[-1]), y.reshape(T, y.shape[-1])
        tokens = st.ctx.tokens(T)
        if wl is not None and merged is None:
            if wl.replace_slots:  # tenant's own tensor replaces the base one: remove x @ W_base^T for its tokens
                y2 = y2.clone()
                for s, idx in tokens.groups():
                    if s in wl.replace_slots:
                        y2[idx] -= nn.functional.linear(x2[idx], self.base.weight)
            d = scheduled_linear(st.kernels, st.costs, st.scratch, x2, tokens, wl)
            if d is not None:
                y2 = y2 + d.to(y2.dtype)
        if bl is not None:
            v = st.kernels.vector(tokens, bl)
            if v is not None:
                y2 = y2 + v.to(y2.dtype)
        if wl is not None and wl.max_extra_rows:
            y2 = torch.cat([y2, self._added_rows(x2, tokens, wl)], 1)
        return y2.reshape(*lead, y2.shape[-1])

    @staticmethod
    def _added_rows(x2: torch.Tensor, tokens: TokenSlots, wl: LayerDeltas) -> torch.Tensor:
        """Outputs of rows a tenant added (vocabulary growth on the head); -inf for tokens of other tenants."""
        out = torch.full((x2.shape[0], wl.max_extra_rows), float("-inf"), dtype=x2.dtype, device=x2.device)
        for s, idx in tokens.groups():
            p = wl.get(s)
            if p is not None and p.extra_rows is not None:
                g = p.extra_rows.shape[0]
                out[idx, :g] = x2[idx] @ p.extra_rows.to(x2.dtype).T
        return out


class DeltaEmbedding(_Wrapped):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        st: DeltaState = self._state
        ctx = st.ctx
        lay = st.layer(self.wkey) if ctx is not None and ctx.any else None
        if lay is None:
            return self.base(ids)
        V = self.base.weight.shape[0]
        flat = ids.reshape(-1)
        tokens = ctx.tokens(flat.numel())
        y = self.base(flat.clamp(max=V - 1))
        if lay.max_extra_rows:  # ids a tenant added: the base has no row for them
            y = y.masked_fill((flat >= V)[:, None], 0)
        if lay.replace_slots:
            y = y.clone()
            for s, idx in tokens.groups():
                if s in lay.replace_slots:
                    y[idx] = 0
        r = st.kernels.rows(flat, tokens, lay)
        if r is not None:
            scale = getattr(self.base, "embed_scale", None)  # scaled embeddings (e.g. Gemma) scale the delta too
            r = r.to(y.dtype)
            if scale is not None:
                r = r * (scale.to(y.dtype) if isinstance(scale, torch.Tensor) else scale)
            y = y + r
        return y.reshape(*ids.shape, y.shape[-1])


class DeltaNorm(_Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        active = self._active()
        if active is None:
            return y
        st, wl, bl = active
        lead = x.shape[:-1]
        T = math.prod(lead)
        tokens = st.ctx.tokens(T)
        y2 = y.reshape(T, y.shape[-1])
        if wl is not None:
            w = self.base.weight
            f1 = torch.func.functional_call(self.base, {"weight": torch.ones_like(w)}, (x,))
            f0 = torch.func.functional_call(self.base, {"weight": torch.zeros_like(w)}, (x,))
            v = st.kernels.vector(tokens, wl)
            if v is not None:
                y2 = y2 + v.to(y2.dtype) * (f1 - f0).reshape(T, -1)
        if bl is not None:
            v = st.kernels.vector(tokens, bl)
            if v is not None:
                y2 = y2 + v.to(y2.dtype)
        return y2.reshape(*lead, y2.shape[-1])


def _is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    own = dict(mod.named_parameters(recurse=False))
    return (
        "norm" in type(mod).__name__.lower()
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and set(own) <= {"weight", "bias"}
        and not list(mod.children())
    )


def wrap_model(model: nn.Module, state: DeltaState) -> dict[str, Site]:
    """Replace every Linear / Embedding / norm module by its delta-aware wrapper. Returns the sites by tensor name."""
    sites: dict[str, Site] = {}
    targets = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            targets.append((name, mod, DeltaLinear, "linear"))
        elif isinstance(mod, nn.Embedding):
            targets.append((name, mod, DeltaEmbedding, "embedding"))
        elif _is_norm(mod):
            targets.append((name, mod, DeltaNorm, "norm"))
    for name, mod, cls, kind in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, cls(mod, name, state))
        w = mod.weight
        sites[f"{name}.weight"] = Site(f"{name}.weight", kind, "weight", tuple(w.shape), True)
        if kind != "embedding":
            b = getattr(mod, "bias", None)
            out = w.shape[0]
            sites[f"{name}.bias"] = Site(f"{name}.bias", kind, "bias", (out,), b is not None)
    return sites


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, ckpt_dtype: torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # CPU matmuls in bf16/fp16 are slow and lossy: compute in fp32 there; on GPU keep the checkpoint's dtype
        if device.type == "cpu":
            return torch.float32
        return ckpt_dtype if ckpt_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return table[dtype]


def serving_dtype(dtype: str | torch.dtype | None, device: torch.device, source) -> torch.dtype:
    """The dtype a base (a ModelSource) is served in on `device`: `dtype`, or with "auto" from its checkpoint's."""
    first = source.meta(source.keys()[0]).dtype if source.keys() else torch.float32
    return _resolve_dtype(dtype, device, first)


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


class _Laps:
    """Seconds since the previous lap, summed by name into `into` (nothing when `into` is None)."""

    def __init__(self, into: dict[str, float] | None):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.into is not None:
            self.into[name] = round(self.into.get(name, 0.0) + now - self.t, 4)
        self.t = now


class ModelRunner:
    """Loads the base model once, wraps it, and runs batched forwards with a tenant slot per row."""

    def __init__(
        self,
        base: str | Path,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = "auto",
        kernels: str | DeltaKernels = "auto",
        max_model_len: int | None = None,
        timings: dict[str, float] | None = None,
    ):
        """`timings`: filled with the seconds of each step of the load (transformers' import, reading the weights,
        the move to the device, the tokenizer): the server's start-up record shows where its "base load" goes."""
        lap = _Laps(timings)
        from transformers import AutoConfig, AutoModelForCausalLM

        from deltapack.io.sources import open_model

        lap("import_s")
        self.source = open_model(base)
        self.path = Path(self.source.path)
        self.device = resolve_device(device)
        self.dtype = serving_dtype(dtype, self.device, self.source)
        try:
            cfg = AutoConfig.from_pretrained(str(self.path))
        except Exception as e:
            raise InputError(f"cannot read the base model's config in {self.path}: {e}") from e
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.dtype)
        except Exception as e:
            raise InputError(f"cannot load the base model from {self.path}: {e.__class__.__name__}: {e}") from e
        lap("read_s")
        self.model = model.to(self.device).eval()
        lap("to_device_s")
        self.config = cfg
        emb = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        if emb is None or head is None:
            raise InputError("the base model has no input embedding / output head: not a causal LM deltapack can serve")
        self.tied = head.weight is emb.weight
        self.embed_key = next(n for n, m in self.model.named_modules() if m is emb) + ".weight"
        self.head_key = next(n for n, m in self.model.named_modules() if m is head) + ".weight"
        self.vocab_size = emb.weight.shape[0]
        self.state = DeltaState(get_kernels(kernels, self.device) if isinstance(kernels, str) else kernels)
        if self.state.kernels.name == "triton" and self.device.type == "cuda":
            from deltapack.kernels.compile import setup_cache_dir

            setup_cache_dir(self.device)  # before the first compilation: restarts find their kernels
        self.sites = wrap_model(self.model, self.state)
        self.cache_kw = cache_kwarg(self.model)
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_model_len = min(limit, max_model_len) if max_model_len else limit
        lap("wrap_s")
        self.tokenizer = load_tokenizer(self.path)
        self.eos_ids = eos_token_ids(self.path, cfg, self.tokenizer)
        self.pad_id = 0
        lap("tokenizer_s")
        log.info("base %s on %s in %s, %d delta sites, kernels=%s", self.path, self.device, self.dtype, len(self.sites), self.state.kernels.name)

    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", 0))

    def layer(self, key: str) -> LayerDeltas:
        lay = self.state.layers.get(key)
        if lay is None:
            lay = self.state.layers[key] = LayerDeltas(key)
        return lay

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache, row_slots: list[int], logits_to_keep: int = 1,
                merged=None):
        """One forward of a (B, L) block; returns (logits (B, L' , W), cache). `merged`: a MergedEntry whose tenant
        owns every row (the caller's guarantee): its linear layers run on the merged weights."""
        self.state.ctx = BatchContext(row_slots, self.device)
        self.state.ctx.merged = merged
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{self.cache_kw: cache},
            )
        finally:
            self.state.ctx = None
        return out.logits, getattr(out, self.cache_kw)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument of the model's forward (and of its output field): transformers 5 renamed
    `past_key_values` to `cache` (the old name is accepted until 5.40, then removed); earlier versions know only
    `past_key_values`. Asking the signature keeps the serving path working on both sides of the rename."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_tokenizer(path: Path):
    """The tokenizer stored next to a checkpoint, or None (then the server takes and returns token ids only)."""
    from deltapack.io.sources import TOKENIZER_FILES

    if not any((path / n).is_file() for n in TOKENIZER_FILES if n not in ("chat_template.jinja", "chat_template.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer should not stop a token-id server; say so
        log.warning("cannot load the tokenizer in %s (%s): serving token ids only", path, e)
        return None


def eos_token_ids(path: Path, cfg, tokenizer) -> set[int]:
    import json

    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if isinstance(x, int))

    add(getattr(cfg, "eos_token_id", None) if not isinstance(cfg, dict) else cfg.get("eos_token_id"))
    gc = path / "generation_config.json"
    if gc.is_file():
        try:
            add(json.loads(gc.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError):
            pass
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


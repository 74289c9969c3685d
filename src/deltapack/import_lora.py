"""import-lora: a peft LoRA adapter directory stored as a deltapack delta (and served as one, beside full fine-tunes).

A LoRA module adds ΔW = s · B A to a weight W (A: r x in, B: out x r; s = lora_alpha / r, or lora_alpha / sqrt(r)
with rsLoRA; r and alpha per module from rank_pattern / alpha_pattern, matched as peft matches them). In deltapack's
factor layout (ΔW = Btᵀ A) that is

    linear     A = lora_A           Bt = lora_Bᵀ           (r x in, r x out)
    embedding  A = lora_embedding_Bᵀ  Bt = lora_embedding_A  (peft's embedding LoRA is (B A)ᵀ: rows = vocabulary)

Stored exactly (no --ratio, or when the exact adapter already meets it): codec `lora` = the adapter's own 16-bit (or
fp32) A and B plus the scale s (docs/format.md). Quantized (--ratio R that the exact form misses): each module is
rotated to its balanced SVD form (Btᵀ A = U S Vᵀ, both sides scaled by √S: exact, cheap at rank r) and both sides
row-quantized (RTN, 8/4/3/2 bits, the widest that reaches R), codec `factors`.

Whole tensors the adapter saves (`modules_to_save` such as embed_tokens / lm_head, biases of `bias="all"`, the
embedding layers peft saves beside an embedding LoRA) become dense deltas (saved − base), exact: bf16 where bf16
holds the difference exactly, else fp32; tensors equal to the base are dropped.

A tied base (input embedding = output head): peft unties it when the adapter changes one side (its merged model keeps
the other side as it was), unless `ensure_weight_tying`; the delta then stores the untied head as its own tensor and
an hf/config.json saying `tie_word_embeddings: false`, so merge and serve rebuild what peft's merged model computes.

Refused with a clear message (never served wrong): DoRA, aLoRA, QA-LoRA, LoRA biases, fan_in_fan_out (Conv1D), LoRA
on raw parameters, trainable tokens, layer replication, vocabulary resizing, other peft types, and any adapter tensor
this reader does not recognise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltapack import __version__
from deltapack.errors import BudgetError, InputError, MismatchError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
METHOD = "lora"
GROUP_SIZE = 128  # columns per quantization group of the quantized factors
QUANT_BITS = (8, 4, 3, 2)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# config fields that change what an adapter computes in a way a fixed delta of the weights cannot carry (or that this
# importer does not implement); a truthy value is refused with the reason
UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported: DoRA rescales every column of the merged weight by a learned "
                "magnitude (W' = m (W + sBA) / ||W + sBA||), which is not a low-rank delta of W. Merge it with peft "
                "(model.merge_and_unload(), save_pretrained) and store the merged model with "
                "`deltapack compress BASE MERGED -o DELTA`",
    "alora_invocation_tokens": "activated LoRA (aLoRA) acts only after its invocation tokens: not a fixed delta",
    "use_qalora": "QA-LoRA pools the input before lora_A: not a plain low-rank delta",
    "lora_bias": "LoRA biases (lora_bias=true) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 style Conv1D weights) are not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE expert tensors) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication changes the model's layer stack",
    "arrow_config": "Arrow routing mixes adapters per token: not one delta",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}
_LINEAR_RE = re.compile(r"^(?P<mod>.+)\.(?P<side>lora_[AB])(?:\.[^.]+)?\.weight$")
_EMBED_RE = re.compile(r"^(?P<mod>.+)\.(?P<side>lora_embedding_[AB])(?:\.[^.]+)?$")
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "embed_in.weight")


@dataclass
class LoraModule:
    """One LoRA module in deltapack's factor orientation: ΔW = scale · Btᵀ A."""

    A: torch.Tensor  # (r x in)
    Bt: torch.Tensor  # (r x out)
    scale: float
    embedding: bool


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # by weight name (module + ".weight")
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # whole tensors saved by the adapter, by name

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.A.shape[0] for n, m in self.modules.items()}


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """A directory holding a peft adapter (adapter_config.json) rather than a deltapack delta."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "delta_config.json").is_file()


def _pattern_value(patterns: dict, module: str, default):
    """peft's per-module override (rank_pattern / alpha_pattern): the first key matching the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_weights(p: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        f = p / name
        if not f.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(f))
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"cannot read the adapter weights {f}: {e.__class__.__name__}: {e}") from e
    raise InputError(f"{p} has no adapter weights ({' or '.join(WEIGHT_FILES)})")


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Parse and check a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors|bin)."""
    p = Path(path)
    if not (p / ADAPTER_CONFIG).is_file():
        raise InputError(f"{p} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p / ADAPTER_CONFIG} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{p / ADAPTER_CONFIG} is not a JSON object")
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise InputError(f"{p}: peft_type {kind!r} is not supported; only LoRA adapters (peft_type LORA) are")
    for key, why in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{p}: {why}")
    r0, alpha0 = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r0, int) or r0 < 1 or not isinstance(alpha0, (int, float)):
        raise InputError(f"{p}: adapter_config.json needs an integer r >= 1 and a numeric lora_alpha")
    weights = _load_weights(p)
    ad = Adapter(p, cfg)
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        k = key.removeprefix("base_model.model.")
        if "lora_magnitude_vector" in k:
            raise InputError(f"{p}: {UNSUPPORTED['use_dora']}")
        m = _LINEAR_RE.match(k) or _EMBED_RE.match(k)
        if m:
            sides.setdefault(m["mod"], {})[m["side"]] = t
            continue
        if ".lora_" in k:
            raise InputError(f"{p}: adapter tensor {key} is not a LoRA A/B weight this importer understands")
        # whole tensors: modules_to_save copies, biases, embedding layers saved beside an embedding LoRA
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k).replace(".base_layer.", ".")
        if ".original_module." in name or not name.endswith((".weight", ".bias")):
            raise InputError(f"{p}: adapter tensor {key} is not a module weight or bias")
        ad.full[name] = t
    for mod, s in sorted(sides.items()):
        emb = "lora_embedding_A" in s or "lora_embedding_B" in s
        a, b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a not in s or b not in s:
            raise InputError(f"{p}: module {mod} has {', '.join(sorted(s))} but not both {a} and {b}")
        A, B = s[a], s[b]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise InputError(f"{p}: module {mod}: {a} {list(A.shape)} and {b} {list(B.shape)} are not r x in / out x r")
        r = int(_pattern_value(cfg.get("rank_pattern"), mod, r0))
        if r != A.shape[0]:
            raise InputError(f"{p}: module {mod} has rank {A.shape[0]} in its weights, {r} in adapter_config.json")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, alpha0))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        # embedding LoRA: ΔW (vocab x dim) = (B A)ᵀ = Aᵀ Bᵀ, so the factor layout's A is Bᵀ and its Bt is A
        ad.modules[f"{mod}.weight"] = LoraModule(B.T, A, scale, True) if emb else LoraModule(A, B.T, scale, False)
    if not ad.modules and not ad.full:
        raise InputError(f"{p}: the adapter holds no LoRA weights")
    return ad


# ---- building the delta -----------------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One tensor of the delta to write."""

    codec: str
    params: dict
    parts: dict[str, torch.Tensor]
    shape: list[int]
    dtype: str
    in_base: bool = True
    method: str | None = None


def _storage_dtype(t: torch.Tensor, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return t.dtype if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return DTYPES[dtype]


def _exact_dense(delta: torch.Tensor, base: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """`delta` in bf16 when base + bf16(delta) rebuilds `target` bit for bit in its dtype, else fp32."""
    d16 = delta.to(torch.bfloat16)
    rebuilt = (d16.float() + (base.float() if base is not None else 0)).to(target.dtype)
    return d16 if torch.equal(rebuilt, target) else delta.float()


def _balanced(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', Bt', S) with Bt'ᵀ A' = scale · Btᵀ A, rows ordered by singular value S, each side scaled by √S (equal
    ranges on both sides quantize best); zero singular values dropped."""
    qa, ra = torch.linalg.qr(m.A.double().T)  # Aᵀ = Qa Ra
    qb, rb = torch.linalg.qr(m.Bt.double().T)  # B = Btᵀ = Qb Rb
    U, S, Vh = torch.linalg.svd(m.scale * (rb @ ra.T))
    keep = int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0
    rs = S[:keep].sqrt()
    A = rs[:, None] * (Vh[:keep] @ qa.T)
    Bt = rs[:, None] * (U[:, :keep].T @ qb.T)
    return A.float(), Bt.float(), S[:keep].float()


def _lora_item(m: LoraModule, shape: list[int], dtype: str, bits: int | None, store: str) -> _Item:
    from deltapack.format.codecs import build_factor_parts
    from deltapack.quant.rtn import quantize_rows

    if bits is None:  # exact: the adapter's own factors and scale
        sd = _storage_dtype(m.A, store)
        params = {"groups": [{"rank": m.A.shape[0], "bits": 16}], "scale": m.scale}
        parts = {"A.float": m.A.to(sd).contiguous(), "Bt.float": m.Bt.to(sd).contiguous()}
        return _Item("lora", params, parts, shape, dtype)
    A, Bt, _ = _balanced(m)
    if bits >= 16:
        params, parts = build_factor_parts([{"bits": 16, "A": A, "Bt": Bt}], torch.bfloat16)
    else:
        params, parts = build_factor_parts(
            [{"bits": bits, "A": quantize_rows(A, bits, GROUP_SIZE), "Bt": quantize_rows(Bt, bits, GROUP_SIZE)}]
        )
    return _Item("factors", params, parts, shape, dtype)


def _lora_bytes(m: LoraModule, bits: int | None, store: str) -> int:
    from deltapack.quant.rtn import qmatrix_bytes

    r, n, o = m.A.shape[0], m.A.shape[1], m.Bt.shape[1]
    if bits is None:
        return r * (n + o) * _storage_dtype(m.A, store).itemsize
    if bits >= 16:
        return r * (n + o) * 2
    return qmatrix_bytes(r, n, bits, GROUP_SIZE) + qmatrix_bytes(r, o, bits, GROUP_SIZE)


def _embed_head(keys: list[str]) -> tuple[str | None, str | None]:
    emb = next((k for k in keys if k.endswith(_EMBED_NAMES)), None)
    head = next((k for k in keys if k in _HEAD_NAMES), None)
    return emb, head


class _Plan:
    """What the adapter changes, checked against the base: LoRA modules and dense deltas, by tensor name."""

    def __init__(self, ad: Adapter, src):
        self.ad = ad
        self.src = src
        keys = src.keys()
        cfg = src.config()
        emb, head = _embed_head(keys)
        self.tied = head is None and emb is not None and bool(cfg.get("tie_word_embeddings", True))
        self.head_name = next((n for n in _HEAD_NAMES if n in ad.full or n in ad.modules), _HEAD_NAMES[0])
        self.loras: dict[str, LoraModule] = {}
        self.dense: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}  # name -> (Δ, base, target)
        self.untie = False
        for name, mod in ad.modules.items():
            shape = self._shape(name)
            want = (mod.Bt.shape[1], mod.A.shape[1])
            if shape is None or tuple(shape) != want:
                where = "has no such weight" if shape is None else f"has it as {list(shape)}"
                raise MismatchError(f"adapter module {name[:-7]} ({want[0]} x {want[1]}): the base {where}")
        for name, t in ad.full.items():
            shape = self._shape(name)
            if shape is None:
                raise MismatchError(f"adapter tensor {name}: the base model has no such tensor")
            if tuple(shape) != tuple(t.shape):
                if len(shape) == 2 and shape[1] == t.shape[1]:
                    raise InputError(f"adapter tensor {name} has {t.shape[0]} rows, the base {shape[0]}: adapters "
                                     "that resize the vocabulary are not supported")
                raise MismatchError(f"adapter tensor {name} has shape {list(t.shape)}, the base {list(shape)}")
        for name, t in ad.full.items():
            base = self._base(name)
            delta = t.float() - base.float()
            if name in ad.modules:  # an embedding saved beside its own LoRA: usually equal to the base
                if bool(delta.any()):
                    m = ad.modules[name]
                    self.dense[name] = (delta + m.scale * (m.Bt.float().T @ m.A.float()), base, None)
                continue
            if bool(delta.any()):
                self.dense[name] = (delta, base, t)
        self.loras = {n: m for n, m in ad.modules.items() if n not in self.dense}
        if self.tied:
            self._untie(emb)

    def _shape(self, name: str):
        if name in self.src:
            return list(self.src.meta(name).shape)
        if self.tied_head(name):
            emb, _ = _embed_head(self.src.keys())
            return list(self.src.meta(emb).shape)
        return None

    def tied_head(self, name: str) -> bool:
        emb, head = _embed_head(self.src.keys())
        return name in _HEAD_NAMES and head is None and emb is not None and name not in self.src

    def _base(self, name: str) -> torch.Tensor:
        if self.tied_head(name):
            return self.src.get(_embed_head(self.src.keys())[0])
        return self.src.get(name)

    def _untie(self, emb: str) -> None:
        """A tied base, as peft's merged model has it: LoRA merges change the one shared parameter in place (the
        embedding and the head both see a LoRA on either); a whole saved copy (modules_to_save) unties the two,
        the other side keeping the shared parameter, unless ensure_weight_tying ties the copy to both."""
        head = self.head_name
        if emb in self.loras and head in self.loras:
            raise InputError(f"{self.ad.path}: LoRA on both the tied embedding and the output head is not supported")
        if self.ad.config.get("ensure_weight_tying") and (emb in self.dense or head in self.dense):
            if emb in self.loras or head in self.loras:
                raise InputError(f"{self.ad.path}: ensure_weight_tying with LoRA on a tied embedding is not supported")
            if head in self.dense:  # the saved copy is both sides: store it once, under the embedding's name
                d, _, t = self.dense.pop(head)
                self.dense.setdefault(emb, (d, self.src.get(emb), t))
            return
        if emb not in self.dense and head not in self.dense:
            if head in self.loras:  # one shared parameter: the head's LoRA changes the embedding too
                self.loras[emb] = self.loras.pop(head)
            return
        self.untie = True
        base = self.src.get(emb)
        shared = base.float()  # the original parameter, changed in place by a LoRA merge of either side
        lora_side = emb if emb in self.loras else head if head in self.loras else None
        if lora_side is not None:
            m = self.loras.pop(lora_side)
            shared = shared + m.scale * (m.Bt.float().T @ m.A.float())
            if emb not in self.dense:
                self.dense[emb] = (shared - base.float(), base, None)
        # the untied head is stored whole (the base has no tensor of its own for it)
        full = base.float() + self.dense.pop(head)[0] if head in self.dense else shared
        self.dense[head] = (full, None, full.to(base.dtype) if lora_side is None else None)

    def items(self, bits: int | None, store: str) -> dict[str, _Item]:
        out: dict[str, _Item] = {}
        for name, m in self.loras.items():
            meta = self.src.meta(name)
            out[name] = _lora_item(m, list(meta.shape), _dt(meta.dtype), bits, store)
        for name, (delta, base, target) in self.dense.items():
            in_base = not (self.untie and name == self.head_name)
            shape = list(delta.shape)
            dt = _dt(self.src.meta(name).dtype) if name in self.src else _dt(self.src.meta(_embed_head(self.src.keys())[0]).dtype)
            if bits is not None:
                values = delta.to(torch.bfloat16)
            else:  # exact: bf16 where it rebuilds the saved tensor bit for bit, else fp32
                values = _exact_dense(delta, base if in_base else None, target) if target is not None else delta.float()
            out[name] = _Item("dense", {}, {"values": values.contiguous()}, shape, dt, in_base, method="dense")
        return dict(sorted(out.items()))

    def dense_bytes(self) -> int:
        return sum(2 * math.prod(self._shape(n)) for n in list(self.loras) + list(self.dense))

    def stored_bytes(self, bits: int | None, store: str) -> int:
        n = sum(_lora_bytes(m, bits, store) for m in self.loras.values())
        for name, (delta, base, target) in self.dense.items():
            n += delta.numel() * (4 if bits is None and target is not None else 2)  # fp32 at worst when exact
        return n


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def import_lora(
    adapter: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    ratio: float | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    fingerprint: bool = True,
    base_source=None,
) -> dict:
    """Store the peft LoRA adapter at `adapter` as a delta directory `out` against `base`. Returns a report dict
    (path, codec, bits, true ratio, modules, dense tensors). `base_source`: an open ModelSource of `base` to reuse;
    `fingerprint=False` skips hashing the base's full content (the server does, for adapters it imports itself)."""
    from deltapack.io.sources import open_model

    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    if ratio is not None and ratio <= 1:
        raise InputError(f"--ratio must be above 1 (got {ratio})")
    from deltapack.io.writer import guard_output

    guard_output(out, adapter, base)  # even with --overwrite: replacing an input would delete it
    ad = read_adapter(adapter)
    src = base_source if base_source is not None else open_model(base)
    plan = _Plan(ad, src)
    if not plan.loras and not plan.dense:
        raise InputError(f"{ad.path}: every tensor of the adapter equals the base (B = 0?): nothing to store")
    dense_total = plan.dense_bytes()
    bits: int | None = None  # None: exact
    if ratio is not None:
        overhead = 4096 + 400 * (len(plan.loras) + len(plan.dense))  # manifest, card, shard header (estimate)
        for b in (None, 16, *QUANT_BITS):
            bits = b
            if dense_total / (plan.stored_bytes(b, dtype) + overhead) >= ratio:
                break
    true_ratio = _write(plan, ad, src, Path(out), bits=bits, store=dtype, ratio=ratio, overwrite=overwrite,
                        fingerprint=fingerprint)
    if ratio is not None and true_ratio < ratio * 0.97:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        dense = ", ".join(sorted(plan.dense)[:3])
        raise BudgetError(
            f"the adapter reaches only {true_ratio:.2f}x at {bits} bits against a {ratio:g}x target"
            + (f": its whole-tensor changes ({dense}) are stored dense" if plan.dense else "")
        )
    return {
        "path": str(Path(out).resolve()),
        "adapter": str(ad.path.resolve()),
        "exact": bits is None,
        "bits": 16 if bits is None else bits,
        "codec": "lora" if bits is None else "factors",
        "true_ratio": true_ratio,
        "lora_modules": len(plan.loras),
        "ranks": sorted({m.A.shape[0] for m in plan.loras.values()}),
        "dense_tensors": sorted(plan.dense),
        "untied_head": plan.untie,
    }


def _write(plan: _Plan, ad: Adapter, src, out: Path, *, bits, store, ratio, overwrite, fingerprint) -> float:
    from deltapack.compress.context import created_stamp
    from deltapack.compress.plan import base_fingerprint
    from deltapack.format.codecs import get_codec
    from deltapack.format.directory import dir_bytes
    from deltapack.format.manifest import MANIFEST_NAME, FileEntry, Manifest, ModelRef, TensorEntry, part_key
    from deltapack.io.writer import AtomicDir, StreamingShardWriter, write_bytes_atomic, write_json_atomic

    items = plan.items(bits, store)
    fp = base_fingerprint(src) if fingerprint else None
    cfg = ad.config
    with AtomicDir(out, overwrite=overwrite, inputs=(ad.path, src.path)) as tmp:
        writer = StreamingShardWriter(tmp, "delta", 1 << 30, metadata={"format": "deltapack"})
        entries: dict[str, TensorEntry] = {}
        try:
            for name, it in items.items():
                codec = get_codec(it.codec)
                payload = sum(t.numel() * t.element_size() for k, t in it.parts.items() if k in codec.payload_parts)
                total = sum(t.numel() * t.element_size() for t in it.parts.values())
                writer.add_group({part_key(name, k): v for k, v in it.parts.items()})
                entries[name] = TensorEntry(
                    shape=it.shape, dtype=it.dtype, codec=it.codec, params=it.params, parts=list(it.parts), file="",
                    dense_bytes=2 * math.prod(it.shape), payload_bytes=payload, side_bytes=total - payload,
                    in_base=it.in_base, method=it.method,
                )
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        for name, e in entries.items():
            e.file = writer.location[part_key(name, e.parts[0])]
        aux, hf_files = {}, {}
        if plan.untie:  # the rebuilt fine-tune has its own head: its config says so
            (tmp / "hf").mkdir()
            write_json_atomic(tmp / "hf" / "config.json", dict(src.config(), tie_word_embeddings=False))
            aux["config.json"] = "delta"
            data = (tmp / "hf" / "config.json").read_bytes()  # the manifest covers hf/ by checksums
            hf_files["config.json"] = FileEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        manifest = Manifest(
            deltapack_version=__version__,
            created=created_stamp(),
            method=METHOD,
            method_params={
                "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
                "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
                "target_modules": cfg.get("target_modules"), "modules_to_save": cfg.get("modules_to_save"),
                "bits": 16 if bits is None else bits, "exact": bits is None,
            },
            target_ratio=ratio,
            base=ModelRef(id=src.model_id, revision=src.revision, fingerprint=fp, structure=src.structure_hash()),
            finetuned=ModelRef(id=f"{cfg.get('base_model_name_or_path') or src.model_id} + LoRA {ad.path.name}"),
            tensors=entries,
            files=files,
            hf_files=hf_files,
            aux=aux,
        )
        card = (
            f"# deltapack delta\n\npeft LoRA adapter `{ad.path.name}` (r={cfg.get('r')}, lora_alpha={cfg.get('lora_alpha')}"
            f"{', rsLoRA' if cfg.get('use_rslora') else ''}) stored against base `{src.model_id}` "
            f"({'exact' if bits is None else f'{bits}-bit factors'}, {len(entries)} tensors).\n\n"
            "Rebuild: `deltapack merge BASE THIS_DIR -o OUT`. Serve: `deltapack serve BASE --delta NAME=THIS_DIR`.\n"
        )
        write_bytes_atomic(tmp / "README.md", card.encode())
        write_bytes_atomic(tmp / MANIFEST_NAME, manifest.dumps().encode())
        true_ratio = manifest.dense_delta_bytes / dir_bytes(tmp)
    log.info("import-lora: wrote %s (%d tensors, true ratio %.2fx)", out, len(entries), true_ratio)
    return true_ratio


def register(main) -> None:
    import click

    @main.command("import-lora")
    @click.argument("adapter", type=click.Path(exists=True, file_okay=False))
    @click.option("-o", "--out", required=True, type=click.Path(), help="delta directory to create")
    @click.option("--base", default=None,
                  help="the base model the adapter was trained on (default: its adapter_config.json "
                       "base_model_name_or_path)")
    @click.option("-r", "--ratio", type=float, default=None,
                  help="target true ratio: stored exactly when the exact adapter reaches it, else its factors are "
                       "quantized (8/4/3/2 bits, the widest that does) [default: exact]")
    @click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
                  help="float type of the exact factors (auto: the adapter's own; bfloat16 halves an fp32 adapter)")
    @click.option("--no-fingerprint", is_flag=True, help="do not hash the base's full content (then merge and serve "
                  "check only tensor names and shapes)")
    @click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    def import_lora_cmd(adapter, out, base, ratio, dtype, no_fingerprint, overwrite, as_json):
        """Store a peft LoRA ADAPTER directory as a delta: exact (16-bit factors and scale as trained), or quantized
        with --ratio. Serve it with `deltapack serve BASE --delta NAME=OUT` (or the adapter directory itself)."""
        if base is None:
            try:
                base = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"cannot read {Path(adapter) / ADAPTER_CONFIG}: {e}") from e
            if not base:
                raise InputError("the adapter does not name its base model (base_model_name_or_path): pass --base")
        rep = import_lora(adapter, base, out, ratio=ratio, dtype=dtype, overwrite=overwrite,
                          fingerprint=not no_fingerprint)
        if as_json:
            click.echo(json.dumps(rep, indent=1))
            return
        how = "exact" if rep["exact"] else f"{rep['bits']}-bit factors"
        click.echo(f"wrote {rep['path']}: {rep['lora_modules']} LoRA modules (rank {', '.join(map(str, rep['ranks'])) or '-'}), "
                   f"{len(rep['dense_tensors'])} whole-tensor deltas, {how}, true ratio {rep['true_ratio']:.2f}x")

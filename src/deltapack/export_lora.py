"""export-lora: write a delta's low-rank part as a peft LoRA adapter (adapter_config.json + adapter_model.safetensors).

Tensors stored by a factor codec (`factors`: lowrank; delta-come's quantized factors are dequantized through
FactorsCodec.factors) are exactly a LoRA update ΔW = Bt^T A:

    lora_A = A      (r x in)
    lora_B = Bt^T   (out x r)
    lora_alpha = r  (peft's scaling alpha/r = 1: the factors already hold the whole delta)

Modules whose rank is below the adapter's `r` (the largest rank) get rank_pattern / alpha_pattern entries (alpha =
rank), so peft builds each module at its own rank with scaling 1. vLLM serves the same directory
(`vllm serve BASE --enable-lora --max-lora-rank R --lora-modules name=DIR`, R >= the adapter's r): it reads each
module's rank from the tensors and scales every module by lora_alpha / r = 1, and the module names are the model's own
(q_proj, ..., down_proj), the ones vLLM's LoRA layers wrap. Untested here (no vLLM in the test environment).

What a LoRA adapter cannot carry is reported, never dropped silently: embedding / lm_head deltas (vLLM rejects
them), 1-D deltas (norms, biases), tensors added by the fine-tune, and any tensor whose codec is not low-rank (dense,
sparse, sign, deltadq). The report is returned, printed by the CLI and written to `export_report.json`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from deltapack.errors import DeltapackError
from deltapack.format.codecs import FactorsCodec, as_2d
from deltapack.format.directory import DeltaDir
from deltapack.io.writer import AtomicDir, guard_output, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
FACTOR_CODECS = ("factors",)
NOT_LINEAR_KEYS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "lm_head", "embed_out")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _why_not(name: str, te) -> str | None:
    """None when tensor `name` can be a LoRA module, else the reason it cannot."""
    if not te.in_base:
        return "tensor added by the fine-tune (LoRA only updates existing weights)"
    if len(te.shape) != 2:
        return f"{len(te.shape)}-D delta (norm / bias): LoRA adapts 2-D linear weights only"
    if any(k in name for k in NOT_LINEAR_KEYS):
        return "embedding / lm_head delta: not exported as LoRA (vLLM does not serve LoRA on them)"
    if not name.endswith(".weight"):
        return "not a module weight"
    if te.base_rows is not None:
        return "vocabulary growth (new rows)"
    if te.codec not in FACTOR_CODECS:
        return f"stored by the {te.codec!r} codec, which is not low-rank"
    return None


def export_lora(delta_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                overwrite: bool = False) -> dict:
    """Write the LoRA adapter for the low-rank tensors of `delta_dir` into `out_dir`. Returns the report dict.
    Raises DeltapackError when no tensor of the delta can be a LoRA module."""
    if dtype not in DTYPES:
        raise DeltapackError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    guard_output(out_dir, delta_dir)
    d = DeltaDir.open(delta_dir)
    d.check()
    man = d.manifest
    exported: dict[str, int] = {}
    skipped: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, te in man.tensors.items():
        why = _why_not(name, te)
        if why is not None:
            skipped.append({"tensor": name, "codec": te.codec, "reason": why})
            continue
        parts = d.parts(name)
        A, Bt = FactorsCodec.factors(te.params, parts, as_2d(te.shape))
        module = name[: -len(".weight")]
        exported[module] = A.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(DTYPES[dtype]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = Bt.T.to(DTYPES[dtype]).contiguous()
    if not exported:
        raise DeltapackError(
            f"{d.path} has no low-rank tensor to export as LoRA (method {man.method!r}; "
            f"{len(skipped)} tensors, codecs: {', '.join(sorted({s['codec'] for s in skipped}))})"
        )
    # r = the largest rank: vLLM checks r against --max-lora-rank and scales every module by lora_alpha / r = 1
    r = max(exported.values())
    pattern = {mod: rank for mod, rank in sorted(exported.items()) if rank != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": man.base.id,
        "revision": man.base.revision,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha == rank per module: scaling 1 everywhere
        "target_modules": _target_modules(sorted(exported), d),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    report = {
        "delta": str(d.path),
        "adapter": str(Path(out_dir).resolve()),
        "base_model_name_or_path": man.base.id,
        "method": man.method,
        "r": r,
        "ranks": dict(sorted(exported.items())),
        "exported": sorted(exported),
        "not_exported": skipped,
        "dtype": dtype,
    }
    from safetensors.torch import save as st_save

    with AtomicDir(out_dir, overwrite=overwrite, inputs=(delta_dir,)) as tmp:
        write_bytes_atomic(tmp / "adapter_model.safetensors", st_save(tensors, metadata={"format": "pt"}))
        write_json_atomic(tmp / "adapter_config.json", config)
        write_json_atomic(tmp / REPORT_NAME, report)
    if skipped:
        log.warning("export-lora: %d of %d tensors are not LoRA-expressible (see %s)", len(skipped),
                    len(man.tensors), REPORT_NAME)
    return report


def _target_modules(modules: list[str], d: DeltaDir) -> list[str]:
    """Leaf names (q_proj, ...) when every decoder layer has every exported leaf, as LoRA adapters usually list them;
    otherwise the full module names, so peft adds no LoRA module where the delta has none."""
    leaves: dict[str, set[str]] = {}
    for mod in modules:
        leaves.setdefault(mod.rsplit(".", 1)[-1], set()).add(mod)
    n_layers = _num_layers(d)
    if n_layers and all(len(mods) == n_layers for mods in leaves.values()):
        return sorted(leaves)
    return modules


def _num_layers(d: DeltaDir) -> int | None:
    import json

    cfg = d.path / "hf" / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return None
    c = c.get("text_config", c)
    n = c.get("num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def register(main) -> None:
    import click

    @main.command("export-lora")
    @click.argument("delta", type=click.Path())
    @click.option("-o", "--out", required=True, type=click.Path(), help="adapter directory to create")
    @click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
                  help="dtype of the adapter weights")
    @click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    def export_lora_cmd(delta, out, dtype, overwrite, as_json):
        """Write DELTA's low-rank tensors as a peft LoRA adapter (loadable by peft and vLLM); report the rest."""
        import json

        rep = export_lora(delta, out, dtype=dtype, overwrite=overwrite)
        if as_json:
            click.echo(json.dumps(rep, indent=1))
            return
        ranks = sorted(set(rep["ranks"].values()))
        click.echo(f"wrote {rep['adapter']}: {len(rep['exported'])} LoRA modules, r={rep['r']}"
                   + (f" (ranks {ranks[0]}..{ranks[-1]} via rank_pattern)" if len(ranks) > 1 else ""))
        if rep["not_exported"]:
            click.echo(f"NOT exported ({len(rep['not_exported'])} tensors; the adapter alone does not rebuild the "
                       f"fine-tune, see {REPORT_NAME}):")
            for s in rep["not_exported"]:
                click.echo(f"  {s['tensor']}: {s['reason']}")

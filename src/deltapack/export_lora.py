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
sparse, sign, deltadq). The report is returned, printed by the CLI and written to `export_report.json`; dropping the
embedding and norm deltas changes the model, so the CLI says so whenever it happens. vLLM needs `--max-lora-rank` at least the adapter's r (and one of its allowed values:
8, 16, 32, 64, 128, 256, 320, 512): the CLI prints the value to pass; `max_rank` (`--max-rank N`) truncates every
module to its best rank-N approximation (SVD of Btᵀ A, exact when the module's rank is at most N) to fit a server's
limit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from deltapack.errors import DeltapackError
from deltapack.format.codecs import as_2d, get_codec
from deltapack.format.directory import DeltaDir
from deltapack.io.writer import AtomicDir, guard_output, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
FACTOR_CODECS = ("factors", "lora")  # lora: an imported peft adapter (factors + a scale)
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
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


def vllm_max_lora_rank(r: int) -> int:
    """The smallest value of vLLM's --max-lora-rank that serves an adapter of rank r."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def truncate_factors(A: torch.Tensor, Bt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A', Bt') of Btᵀ A (Eckart-Young, through QR of both sides: no dense matrix)."""
    qa, ra = torch.linalg.qr(A.double().T)
    qb, rb = torch.linalg.qr(Bt.double().T)
    U, S, Vh = torch.linalg.svd(rb @ ra.T)
    rs = S[:rank].sqrt()
    return (rs[:, None] * (Vh[:rank] @ qa.T)).float(), (rs[:, None] * (U[:, :rank].T @ qb.T)).float()


def export_lora(delta_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                overwrite: bool = False, max_rank: int | None = None) -> dict:
    """Write the LoRA adapter for the low-rank tensors of `delta_dir` into `out_dir`. Returns the report dict.
    `max_rank`: truncate modules of higher rank to their best rank-`max_rank` approximation.
    Raises DeltapackError when no tensor of the delta can be a LoRA module."""
    if dtype not in DTYPES:
        raise DeltapackError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if max_rank is not None and max_rank < 1:
        raise DeltapackError(f"--max-rank must be at least 1 (got {max_rank})")
    guard_output(out_dir, delta_dir)
    d = DeltaDir.open(delta_dir)
    d.check()
    man = d.manifest
    exported: dict[str, int] = {}
    truncated: dict[str, int] = {}
    skipped: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for name, te in man.tensors.items():
        why = _why_not(name, te)
        if why is not None:
            skipped.append({"tensor": name, "codec": te.codec, "reason": why})
            continue
        parts = d.parts(name)
        A, Bt = get_codec(te.codec).factors(te.params, parts, as_2d(te.shape))
        module = name[: -len(".weight")]
        if max_rank is not None and A.shape[0] > max_rank:
            A, Bt = truncate_factors(A, Bt, max_rank)
            truncated[module] = int(max_rank)
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
        "dropped_kinds": _dropped_kinds(skipped),
        "truncated_to_rank": max_rank if truncated else None,
        "truncated": sorted(truncated),
        "vllm_max_lora_rank": vllm_max_lora_rank(r),
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


def _dropped_kinds(skipped: list[dict]) -> list[str]:
    """What kinds of change the adapter leaves out: embedding / head, norm and bias (1-D), other."""
    kinds = set()
    for sk in skipped:
        r = sk["reason"]
        kinds.add("embedding/lm_head" if r.startswith("embedding") else "norm/bias" if "1-D" in r or "-D delta" in r else "other")
    return sorted(kinds)


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
    @click.option("--max-rank", type=click.IntRange(min=1), default=None,
                  help="truncate every module to at most this rank (best approximation), e.g. to fit vLLM's "
                       "--max-lora-rank [default: keep each module's rank]")
    @click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
    @click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
    def export_lora_cmd(delta, out, dtype, max_rank, overwrite, as_json):
        """Write DELTA's low-rank tensors as a peft LoRA adapter (loadable by peft and vLLM); report the rest.

        A LoRA adapter carries linear-layer deltas only: embedding, lm_head and norm deltas are dropped (the output
        lists them; the adapter then differs from the fine-tune `deltapack merge` rebuilds). vLLM needs
        `--max-lora-rank` at least the adapter's r: the output says which value; --max-rank caps r."""
        import json

        rep = export_lora(delta, out, dtype=dtype, overwrite=overwrite, max_rank=max_rank)
        if as_json:
            click.echo(json.dumps(rep, indent=1))
            return
        ranks = sorted(set(rep["ranks"].values()))
        click.echo(f"wrote {rep['adapter']}: {len(rep['exported'])} LoRA modules, r={rep['r']}"
                   + (f" (ranks {ranks[0]}..{ranks[-1]} via rank_pattern)" if len(ranks) > 1 else ""))
        if rep["truncated"]:
            click.echo(f"truncated {len(rep['truncated'])} modules to rank {rep['truncated_to_rank']} (--max-rank)")
        click.echo(f"vLLM: vllm serve BASE --enable-lora --max-lora-rank {rep['vllm_max_lora_rank']} "
                   f"--lora-modules NAME={rep['adapter']}")
        if rep["not_exported"]:
            kinds = " and ".join(rep["dropped_kinds"])
            click.echo(f"NOT exported ({len(rep['not_exported'])} tensors: {kinds} deltas; the adapter alone does not "
                       f"rebuild the fine-tune, see {REPORT_NAME}):")
            for s in rep["not_exported"]:
                click.echo(f"  {s['tensor']}: {s['reason']}")

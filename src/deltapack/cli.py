"""deltapack command line. Every failure a user can cause prints one `error: ...` line and exits 2."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import click

from deltapack import __version__
from deltapack.errors import DeltapackError

log = logging.getLogger("deltapack")


class DeltapackGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeltapackError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _parse_params(items: tuple[str, ...]) -> dict:
    """`-p key=value` pairs; values parsed as JSON where they can be (numbers, booleans, lists)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise DeltapackError(f"method parameter {it!r} is not key=value")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@click.group(cls=DeltapackGroup)
@click.version_option(__version__, prog_name="deltapack")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug")
def main(verbose: int) -> None:
    """Store full fine-tunes as compressed deltas against their base; rebuild, check, evaluate and serve them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--out", required=True, type=click.Path(), help="delta directory to create")
@click.option("-m", "--method", default="auto", show_default=True, help="see `deltapack methods`")
@click.option("-r", "--ratio", type=float, default=None, help="target TRUE ratio (default 16; the lossless methods (lossless, raw, dense-exact) take none)")
@click.option("-p", "--param", "params", multiple=True, help="method knob key=value (repeatable)")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="JSON/YAML config file")
@click.option("--calib", type=click.Path(), default=None, help="calibration text (.txt) or .jsonl")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--max-shard-size", default="1GB", show_default=True, help="largest delta shard")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--trust-remote-code", is_flag=True, help="allow a model's custom code (never needed to read tensors)")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU runs: units encoded at once, in worker processes of one torch thread each (the output bytes "
                   "are the same for any value; more than the free cores only slows it down)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--heal", is_flag=True, help="after encoding, train the delta's scales and float parts against the "
              "fine-tune's logits on calibration text (codes unchanged; minutes)")
@click.option("--heal-seconds", type=float, default=None, help="time limit of --heal in seconds (default 90)")
def compress(base, finetuned, out, method, ratio, params, config_file, calib, device, max_shard_size, overwrite,
             trust_remote_code, threads, quiet, heal, heal_seconds):
    """Compress FINETUNED against BASE into a delta directory at a target true ratio.

    BASE and FINETUNED: a local HF checkpoint directory, a .gguf file, or a hub id org/name[@revision].
    """
    from deltapack.compress import compress as run
    from deltapack.config import load_compress_config, resolve

    if heal_seconds is not None and not heal:
        raise click.UsageError("--heal-seconds needs --heal")

    cfg = load_compress_config(config_file) if config_file else None
    mparams = dict(cfg.params) if cfg else {}
    mparams.update(_parse_params(params))  # -p key=value over the file's params, key by key
    # flag > config file > default, whichever way the flag was given (even equal to its default)
    v = resolve(click.get_current_context(), cfg, {"method": method, "ratio": ratio, "calib": calib})
    method, ratio, calib = v["method"], v["ratio"], v["calib"]
    path = run(
        base, finetuned, out, method=method, ratio=ratio, params=mparams, calib=calib, device=device,
        overwrite=overwrite, max_shard_bytes=_size(max_shard_size), trust_remote_code=trust_remote_code,
        progress=not quiet, threads=threads,
        heal=({"max_seconds": heal_seconds} if heal_seconds is not None else True) if heal else None,
    )
    from deltapack.api import inspect as insp

    info = insp(path)
    click.echo(
        f"wrote {path}: {info['changed_tensors']} tensors, {info['total_bytes'] / 1e6:.2f} MB, "
        f"true ratio {info['true_ratio']:.2f}x (nominal {info['nominal_ratio']:.2f}x)"
    )


@main.command()
@click.argument("base")
@click.argument("delta", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="HF checkpoint directory to create")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--no-verify-base", is_flag=True, help="skip the full-content base fingerprint check")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="dtype of the written weights; auto: the fine-tune's own; float32: base + delta without rounding")
@click.option("--quiet", is_flag=True)
def merge(base, delta, out, max_shard_size, overwrite, no_verify_base, dtype, quiet):
    """Rebuild the fine-tune (BASE + DELTA) as an HF checkpoint that transformers loads."""
    import torch

    from deltapack.api import merge as run

    path = run(base, delta, out, overwrite=overwrite, max_shard_bytes=_size(max_shard_size), progress=not quiet,
               verify_base=not no_verify_base, dtype=None if dtype == "auto" else getattr(torch, dtype))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("delta", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(delta, as_json):
    """Per-tensor codec and bits per element; true (on-disk) and nominal ratio."""
    from deltapack.api import inspect as run

    info = run(delta)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"{info['path']}  method={info['method']}  target={info['target_ratio']}")
    click.echo(f"base: {info['base']['id']}  fine-tune: {info['finetuned']['id']}")
    w = max([len(r["name"]) for r in info["tensors"]] + [6])
    click.echo(f"{'tensor':<{w}}  {'codec':<8} {'bits/el':>8} {'ratio':>8}  detail")
    for r in info["tensors"]:
        click.echo(f"{r['name']:<{w}}  {r['codec']:<8} {r['bits_per_element']:8.3f} {r['ratio']:8.2f}  {json.dumps(r['detail'])}")
    click.echo(
        f"{info['changed_tensors']} changed tensors ({info['unchanged_tensors']} unchanged, not stored); "
        f"dense bf16 delta {info['dense_delta_bytes'] / 1e6:.2f} MB; on disk {info['total_bytes'] / 1e6:.3f} MB"
    )
    click.echo(f"true ratio {info['true_ratio']:.2f}x   nominal ratio {info['nominal_ratio']:.2f}x")


@main.command()
@click.argument("base")
@click.argument("delta", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def verify(base, delta, as_json):
    """Check DELTA's manifest and file checksums, that it decodes, and that BASE is the exact base it was made against."""
    from deltapack.api import verify as run

    rep = run(base, delta, progress=not as_json)
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        click.echo(f"manifest: ok (format {rep['format_version']}, "
                   f"{'digest checked' if rep['manifest_digest'] else 'NO DIGEST: edits to it and to hf/ go undetected'})")
        click.echo(f"checksums: {'ok' if rep['checksums_ok'] else 'BAD ' + ', '.join(rep['bad_files'])}")
        click.echo(f"decodes: {'ok (every tensor, finite)' if rep['decode_ok'] else 'not tried (checksums bad)'}")
        click.echo(f"base structure: {'ok' if rep.get('base_structure_ok') else 'MISMATCH'}")
        click.echo(f"base fingerprint: {'ok' if rep.get('base_fingerprint_ok') else 'MISMATCH'}")
    if not rep["ok"]:
        raise DeltapackError("verification failed")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json):
    """List compression methods, their papers and knobs."""
    from deltapack.methods import method_table

    rows = method_table()
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    for r in rows:
        cal = "needs calibration" if r["needs_calibration"] else ("uses calibration" if r["uses_calibration"] else "data-free")
        click.echo(f"{r['name']:<12} {r['summary']}  [{cal}]\n{'':<12} paper: {r['paper']}")
        click.echo(f"{'':<12} knobs: {json.dumps(r['knobs'], default=str)}")
    which = which_method_text()
    if which:
        click.echo(f"\nWhich method to use (`auto` is the default):\n{which}")


def which_method_text() -> str:
    """The benchmark's which-method table as shipped in the package (generated by bench/quality/report.py)."""
    from importlib.resources import files

    try:
        text = files("deltapack.methods").joinpath("which_method.md").read_text()
    except (FileNotFoundError, OSError):
        return ""
    return "\n".join(line for line in text.splitlines() if not line.startswith("<!--")).strip()


@main.command()
@click.option("-o", "--out", default="demo-out", show_default=True, type=click.Path())
@click.option("--methods", "method_list", default=None, help="comma-separated (default: every method)")
@click.option("--ratio", default=16.0, show_default=True)
@click.option("--steps", default=None, type=int, help="fine-tuning steps (default: the demo's)")
def demo(out, method_list, ratio, steps):
    """Fine-tune the embedded SmolLM2-135M-Instruct a little, compress with each method, rebuild, score, plot."""
    from deltapack.demo import run_demo

    run_demo(Path(out), methods=method_list.split(",") if method_list else None, ratio=ratio, steps=steps)


def _size(s: str) -> int:
    s = s.strip().upper()
    mult = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1024, "MIB": 1 << 20, "GIB": 1 << 30}
    for suf, m in sorted(mult.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suf):
            try:
                return int(float(s[: -len(suf)]) * m)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise DeltapackError(f"cannot parse size {s!r} (e.g. 500MB, 2GB)") from None


# Later parts of the pipeline register their own commands (eval, serve, share, export-lora, import-lora, compress-many).
for _mod in ("deltapack.eval.cli", "deltapack.serve.cli", "deltapack.share.cli", "deltapack.export_lora", "deltapack.import_lora", "deltapack.scale.cli"):
    try:
        importlib.import_module(_mod).register(main)
    except ModuleNotFoundError as e:
        if e.name is None or not _mod.startswith(e.name):
            raise


if __name__ == "__main__":
    main()

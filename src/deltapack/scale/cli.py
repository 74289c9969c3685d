"""`deltapack compress-many`: registered on the main CLI group (see the loop at the bottom of deltapack/cli.py)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    @main.command("compress-many")
    @click.argument("base")
    @click.argument("finetunes", nargs=-1, required=True)
    @click.option("-o", "--out", required=True, type=click.Path(), help="directory: one delta directory per fine-tune")
    @click.option("-m", "--method", default="auto", show_default=True, help="see `deltapack methods`")
    @click.option("-r", "--ratio", type=float, default=None, help="target TRUE ratio (default 16; the lossless methods (lossless, raw, dense-exact) take none)")
    @click.option("-p", "--param", "params", multiple=True, help="method knob key=value (repeatable)")
    @click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                  help="JSON/YAML config file (method, ratio, calib, params); flags override it")
    @click.option("--calib", type=click.Path(), default=None, help="calibration text (.txt) or .jsonl")
    @click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
    @click.option("--max-shard-size", default="1GB", show_default=True, help="largest delta shard")
    @click.option("--ray", "ray_address", default=None, help="run on Ray: 'auto' (running cluster) or an address; "
                  "'local' starts a local one. Without it: a local process pool")
    @click.option("--workers", type=int, default=None, help="tasks in flight (default: from CPUs/GPUs)")
    @click.option("--threads", type=int, default=None,
                  help="torch threads per task (default: DELTAPACK_THREADS or 1; outputs equal "
                       "`deltapack compress` run with the same thread count)")
    @click.option("--gpus-per-task", type=float, default=None, help="Ray: GPUs per task (default 1 when on GPU)")
    @click.option("--fts-per-task", type=int, default=None,
                  help="fine-tunes sharing one read of a base tensor in a task (default: all)")
    @click.option("--retries", type=int, default=2, show_default=True, help="Ray: retries of a task whose worker died")
    @click.option("--restart", is_flag=True, help="discard an unfinished run in OUT/.work instead of resuming it")
    @click.option("--overwrite", is_flag=True, help="redo fine-tunes whose delta directory already exists")
    @click.option("--trust-remote-code", is_flag=True, help="allow a model's custom code (never needed to read tensors)")
    @click.option("--quiet", is_flag=True, help="no progress bars")
    def compress_many_cmd(base, finetunes, out, method, ratio, params, config_file, calib, device, max_shard_size, ray_address,
                          workers, threads, gpus_per_task, fts_per_task, retries, restart, overwrite, trust_remote_code,
                          quiet):
        """Compress several fine-tunes of BASE, in parallel, into OUT/<name>/ (re-run to resume an interrupted run).

        FINETUNES: paths, hub ids or NAME=PATH. Each OUT/<name>/ equals what `deltapack compress` writes for that
        fine-tune alone.
        """
        from deltapack.api import inspect as insp
        from deltapack.cli import _parse_params, _size
        from deltapack.config import load_compress_config, resolve
        from deltapack.scale.many import compress_many

        cfg = load_compress_config(config_file) if config_file else None
        mparams = {**(cfg.params if cfg else {}), **_parse_params(params)}
        v = resolve(click.get_current_context(), cfg, {"method": method, "ratio": ratio, "calib": calib})
        method, ratio, calib = v["method"], v["ratio"], v["calib"]

        ray = None
        if ray_address:
            ray = True if ray_address == "local" else ray_address
        summary = compress_many(
            base, list(finetunes), out, method=method, ratio=ratio, params=mparams, calib=calib,
            device=device, max_shard_bytes=_size(max_shard_size), trust_remote_code=trust_remote_code, ray=ray,
            workers=workers, threads=threads, gpus_per_task=gpus_per_task, fts_per_task=fts_per_task, retries=retries,
            overwrite=overwrite, restart=restart, progress=not quiet,
        )
        for name, path in summary["outputs"].items():
            info = insp(path)
            click.echo(f"{name}: {path}  {info['total_bytes'] / 1e6:.2f} MB, true ratio {info['true_ratio']:.2f}x")
        click.echo(
            f"{len(summary['encoded_units'])} units encoded, {len(summary['skipped_units'])} already done, "
            f"{len(summary['finished_before'])} fine-tunes already finished; {summary['seconds']:.1f} s "
            f"({summary['backend'] or 'nothing to do'})"
        )

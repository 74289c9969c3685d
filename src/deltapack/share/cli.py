"""`deltapack share`: registered on the main CLI group by deltapack.cli."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    @main.command("share")
    @click.argument("model")
    @click.option("-o", "--out", required=True, type=click.Path(), help="shared-model directory to create")
    @click.option("--method", type=click.Choice(["deltallm", "layerdrop"]), default="deltallm", show_default=True,
                  help="deltallm: share block weights (the paper); layerdrop: drop the blocks of lowest Block Influence "
                       "and heal the rest by the same distillation, written as a plain HF checkpoint. On SmolLM2-135M "
                       "layerdrop had the lower KL and kept more exact answers at -12% and -24% (README, "
                       "bench/results/share.json)")
    @click.option("--reduction", type=float, default=0.12, show_default=True, help="fraction of ALL parameters to remove (embeddings included)")
    @click.option("--pattern", type=click.Choice(["sequential", "alternating"]), default="sequential", show_default=True)
    @click.option("--modules", type=click.Choice(["mlp", "attn", "all"]), default="mlp", show_default=True, help="which linears of a block are shared")
    @click.option("--rank", type=int, default=None, help="starting delta rank (default F/(2c)); raised to land on the target")
    @click.option("--group", type=int, default=None, help="sequential: most dependents per anchor (default 3)")
    @click.option("--criterion", type=click.Choice(["kl", "residual"]), default="kl", show_default=True, help="how candidate (block, anchor) pairs are scored")
    @click.option("--tokens", type=int, default=4_000_000, show_default=True, help="training tokens")
    @click.option("--data", type=click.Path(), default=None, help="training text (.txt / .jsonl); default: Python's own docs")
    @click.option("--self-chat", type=click.IntRange(min=0), default=1024, show_default=True,
                  help="also train on this many answers the original model generates itself (keeps chat behaviour; 0: off)")
    @click.option("--self-text", type=click.IntRange(min=0), default=None,
                  help="also train on this many 256-token texts the original writes freely from a random start token "
                       "(data-free distillation; default 8192 on a GPU, ~100 s for SmolLM2-135M on an H100; 0 on a "
                       "CPU, where 8192 would take about 2 hours on 2 cores: pass a number to opt in)")
    @click.option("--batch-size", type=int, default=16, show_default=True)
    @click.option("--seq-len", type=int, default=256, show_default=True)
    @click.option("--lr", type=float, default=5e-4, show_default=True)
    @click.option("--alpha", type=float, default=1.0, show_default=True, help="loss = (1-alpha)*LM + alpha*KL")
    @click.option("--replace-frac", type=float, default=0.3, show_default=True, help="share of steps over which blocks are progressively replaced")
    @click.option("--train-norms", is_flag=True, help="also train the norm weights of dependent blocks")
    @click.option("--block-lr", type=click.FloatRange(min=0), default=0.0, show_default=True,
                  help="also train every other block weight (anchors, attention, intact blocks) at this learning rate; "
                       "beyond the paper, which trains only the deltas (0). Needs about 6-7x a 16-bit model's memory")
    @click.option("--heal-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="layerdrop: learning rate of the healed block weights [default: 3e-4]")
    @click.option("--local-steps", type=int, default=200, show_default=True, help="block-wise fit steps per dependent before distillation (0: off)")
    @click.option("--max-seconds", type=float, default=None, help="wall-time bound for training (fewer steps if needed)")
    @click.option("--save-every", type=int, default=200, show_default=True, help="checkpoint every N steps")
    @click.option("--resume", is_flag=True, help="continue from the last checkpoint in OUT.ckpt/")
    @click.option("--keep-checkpoints", is_flag=True, help="keep OUT.ckpt/ after success")
    @click.option("--export-dense", type=click.Path(), default=None, help="also write a plain HF checkpoint here")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
    @click.option("--overwrite", is_flag=True, help="replace OUT (and the dense export) if they exist")
    @click.option("--quiet", is_flag=True, help="no progress bars")
    @click.pass_context
    def share_cmd(ctx, model, out, method, reduction, pattern, modules, rank, group, criterion, tokens, data, self_chat, self_text, batch_size, seq_len, lr, alpha,
                  replace_frac, train_norms, block_lr, heal_lr, local_steps, max_seconds, save_every, resume, keep_checkpoints, export_dense, seed, device, overwrite, quiet):
        """Share block weights inside MODEL (DeltaLLM): dependents = anchor + trained low-rank delta.

        MODEL: a local HF checkpoint directory, a .gguf file or a hub id. Load the result with
        deltapack.share.load_shared(OUT); with --method layerdrop, OUT is a plain HF checkpoint
        (transformers' from_pretrained).
        """
        from deltapack.errors import InputError
        from deltapack.share.pipeline import DEFAULT_HEAL_LR, drop_and_heal, share
        from deltapack.share.train import TrainConfig

        only = {"deltallm": ("pattern", "modules", "rank", "group", "criterion", "lr", "replace_frac", "train_norms",
                             "block_lr", "local_steps", "export_dense"), "layerdrop": ("heal_lr",)}
        for other, names in only.items():
            if other != method:
                given = [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
                if given:
                    opts = ", ".join("--" + n.replace("_", "-") for n in given)
                    raise click.UsageError(f"{opts} only applies to --method {other}")

        if min(tokens, batch_size, seq_len) < 1 or seq_len < 2:
            raise InputError("--tokens, --batch-size and --seq-len must be positive (--seq-len at least 2)")
        cfg = TrainConfig(tokens=tokens, batch_size=batch_size, seq_len=seq_len, lr=lr, alpha=alpha, replace_frac=replace_frac,
                          train_norms=train_norms, block_lr=block_lr, local_steps=local_steps, max_seconds=max_seconds,
                          save_every=save_every, seed=seed)
        if method == "layerdrop":
            res = drop_and_heal(model, out, reduction=reduction, heal_lr=heal_lr or DEFAULT_HEAL_LR, data=data,
                                self_chat=self_chat, self_text=self_text, train=cfg, device=device, resume=resume,
                                keep_checkpoints=keep_checkpoints, overwrite=overwrite, progress=not quiet)
            p, ev = res["params"], res["eval_heldout"]
            click.echo(f"wrote {res['path']} (plain HF checkpoint): {p['final']:,} parameters (was {p['original']:,}); "
                       f"dropped blocks {res['dropped_blocks']} = {100 * p['reduction']:.4f}% "
                       f"(target {100 * p['reduction_target']:g}%)")
            click.echo(f"held-out KL to the original: {ev['kl_dropped']:.4f} dropped -> {ev['kl_healed']:.4f} healed "
                       f"({res['training']['tokens']:,} tokens, {res['training']['seconds']:.0f} s)")
            return
        res = share(model, out, reduction=reduction, pattern=pattern, modules=modules, rank=rank, group=group,
                    criterion=criterion, data=data, self_chat=self_chat, self_text=self_text, train=cfg, device=device, resume=resume, keep_checkpoints=keep_checkpoints,
                    export_dense=export_dense, overwrite=overwrite, progress=not quiet)
        p = res["params"]
        ev = res["eval_heldout"]
        click.echo(f"wrote {res['path']}: {p['final']:,} parameters (was {p['original']:,}); removed {p['removed']:,} = "
                   f"{100 * p['reduction']:.4f}% (target {100 * p['reduction_target']:g}%)")
        click.echo(f"held-out KL to the original: {ev['kl_svd_init']:.4f} at SVD init -> {ev['kl_trained']:.4f} trained "
                   f"({res['training']['tokens']:,} tokens, {res['training']['seconds']:.0f} s)")
        if export_dense:
            click.echo(f"dense export: {export_dense}")

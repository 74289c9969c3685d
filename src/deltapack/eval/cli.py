"""`deltapack eval`: registered on the main CLI group by `register(main)` (see deltapack.cli)."""

from __future__ import annotations

import json

import click


def _split(values: tuple[str, ...]) -> list[str]:
    """Repeatable option values, each possibly comma-separated."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.command("eval")
@click.argument("base")
@click.argument("target")
@click.option("--tasks", "task_files", multiple=True, help="prompt/answer JSONL task file (repeatable or comma-separated)")
@click.option("--reference", default=None, help="the real fine-tune: its accuracy, and KL(reference || target)")
@click.option("--ppl-text", type=click.Path(), default=None, help="text file for perplexity")
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="write a PNG of the metrics")
@click.option("--json", "json_path", type=click.Path(), default=None, help="write the full report as JSON")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32")
@click.option("--max-new-tokens", type=int, default=None, help="greedy decode length (default: longest answer + 8)")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--first-line", is_flag=True, help="compare only the first non-empty line of the completion")
@click.option("--chat/--no-chat", default=None, help="force the chat template on/off (default: use it when present)")
@click.option("--limit", type=int, default=None, help="first N examples of each task")
@click.option("--kl-limit", type=int, default=None, help="first N examples of each task for KL (default: --limit)")
@click.option("--base-accuracy", is_flag=True, help="also score BASE on the tasks")
@click.option("--ppl-seq-len", type=int, default=512, show_default=True)
@click.option("--lm-eval", "lm_eval_tasks", multiple=True, help="lm-evaluation-harness task names (needs lm-eval)")
@click.option("--lm-eval-include", type=click.Path(), default=None, help="directory of local lm-eval YAML tasks")
@click.option("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task (int) or fraction")
@click.option("--lm-eval-local-only", is_flag=True, help="know only --lm-eval-include's tasks (skips indexing built-ins)")
@click.option("--numerics", type=click.Choice(["served", "merged"]), default="served", show_default=True,
              help="a DELTA target computed as `deltapack serve` computes it (base(x) + delta(x), the delta never "
                   "rounded: the numbers the server's users get) or as the checkpoint `deltapack merge` writes "
                   "(base + delta rounded to the fine-tune's dtype)")
@click.option("--no-verify-base", is_flag=True, help="skip the base fingerprint check when rebuilding a delta")
@click.option("--quiet", is_flag=True, help="no progress bars")
def eval_command(base, target, task_files, reference, ppl_text, plot_path, json_path, device, dtype, max_new_tokens,
                 batch_size, first_line, chat, limit, kl_limit, base_accuracy, ppl_seq_len, lm_eval_tasks,
                 lm_eval_include, lm_eval_limit, lm_eval_local_only, numerics, no_verify_base, quiet):
    """Evaluate TARGET (a DELTA directory rebuilt against BASE in memory, or a MERGED_DIR / any checkpoint).

    Exact-match accuracy on prompt/answer JSONL tasks (greedy decoding; answers compared after stripping
    whitespace), KL(reference || target) per completion token on the same prompts, perplexity on a text file,
    and lm-evaluation-harness tasks.
    """
    from deltapack.eval.runner import evaluate
    from deltapack.io.writer import write_json_atomic

    limit_lm = None
    if lm_eval_limit is not None:
        limit_lm = int(lm_eval_limit) if lm_eval_limit >= 1 else lm_eval_limit
    report = evaluate(
        base, target, tasks=_split(task_files), reference=reference, ppl_text=ppl_text, device=device, dtype=dtype,
        max_new_tokens=max_new_tokens, batch_size=batch_size, first_line=first_line, chat=chat, limit=limit,
        kl_limit=kl_limit if kl_limit is not None else limit, base_accuracy=base_accuracy, ppl_seq_len=ppl_seq_len,
        lm_eval_tasks=_split(lm_eval_tasks), lm_eval_include=lm_eval_include, lm_eval_limit=limit_lm,
        lm_eval_defaults=not lm_eval_local_only,
        verify_base=not no_verify_base, progress=not quiet, numerics=numerics,
    )
    if json_path:
        from pathlib import Path

        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, report)
    if plot_path:
        from deltapack.eval.plots import plot_report

        plot_report(report, plot_path)
    _print_summary(report)


def _print_summary(r: dict) -> None:
    if "delta" in r:
        d = r["delta"]
        click.echo(f"{r['target']}: {d['method']} delta, true ratio {d['true_ratio']:.2f}x (nominal {d['nominal_ratio']:.2f}x)")
    else:
        click.echo(f"{r['target']}: checkpoint")
    for name, t in r["tasks"].items():
        parts = [f"{name:<20} n={t['n']:<5}"]
        if "model" in t:
            parts.append(f"accuracy {t['model']['accuracy']:.4f}")
        if "reference" in t:
            parts.append(f"reference {t['reference']['accuracy']:.4f}")
        if t.get("kept") is not None:
            parts.append(f"kept {t['kept']:.3f}")
        if "base" in t:
            parts.append(f"base {t['base']['accuracy']:.4f}")
        if "kl" in t:
            parts.append(f"KL {t['kl']['kl']:.5f}")
        click.echo("  ".join(parts))
    if "perplexity" in r:
        p = r["perplexity"]
        line = f"perplexity: model {p['model']['ppl']:.3f}" if "model" in p else "perplexity:"
        if "reference" in p:
            line += f"  reference {p['reference']['ppl']:.3f}"
        click.echo(line)
    if "lm_eval" in r:
        for task, metrics in r["lm_eval"].get("results", {}).items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
            click.echo(f"lm-eval {task}: {json.dumps(shown)}")


def register(main: click.Group) -> None:
    main.add_command(eval_command)

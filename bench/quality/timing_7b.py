"""Compression time and peak GPU memory of every method on a Llama-2-7B-shaped base/fine-tune pair.

Path measured: the real one. A synthetic pair is written once as sharded bf16 safetensors checkpoints (HF layout,
config, a word-level tokenizer so calibration-based methods can tokenize text), then each method runs through
`deltapack.api.compress(base_dir, ft_dir, out, device="cuda")`: planning pass, fingerprint, budget, per-tensor
encode, atomic write, exactly as a user's run. Seconds are wall time of that call; peak GPU memory is
torch.cuda.max_memory_allocated over it. The delta directory is deleted after its size is read.

Synthetic weights (Llama-2-7B shapes: 32 layers of q,k,v,o 4096x4096, gate/up 11008x4096, down 4096x11008, embeddings
and lm_head 32000x4096, RMSNorm vectors): base ~ N(0, 0.02^2); each matrix delta = A diag(s) B with A, B Gaussian
(near-orthogonal columns), s_i ∝ i^-0.5 over the full rank (a long-tailed spectrum like real full fine-tunes), scaled
to an RMS of 1e-3 (5% of the weights' RMS), plus 10% i.i.d. noise; norm vectors get small dense deltas. Each tensor
is generated from its own seed on the compute device, so the pair is the same on every run.

Disk: two checkpoints of 13.5 GB (27 GB) in --workdir, kept there and reused while the machine stays warm (a marker
file records the shape); the one delta dir at a time is small except raw (13.5 GB, off by default).

    python bench/quality/timing_7b.py --methods lowrank,bitdelta,dare --out bench/results/parts/timing-7b-1.json
    python bench/quality/timing_7b.py --smoke --out /tmp/timing-smoke.json     # CPU, 2 layers of hidden 256
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, device_name, now_iso, write_json  # noqa: E402
from run import ALIASES, Budget, select_methods  # noqa: E402

log = logging.getLogger("bench.timing7b")

DEFAULT_METHODS = "lowrank,bitdelta,dare,delta-come-paper,delta-come-optimal,deltadq,bitdelta-distill"


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, hd = self.hidden, self.inter, self.hidden // self.heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            out += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (self.kv_heads * hd, h)),
                (f"{p}.self_attn.v_proj.weight", (self.kv_heads * hd, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def label(self) -> str:
        return f"llama h{self.hidden} i{self.inter} L{self.layers} V{self.vocab}"


LLAMA2_7B = Shape(hidden=4096, inter=11008, layers=32, vocab=32000, heads=32, kv_heads=32)
SMOKE = Shape(hidden=256, inter=688, layers=2, vocab=2048, heads=4, kv_heads=4)


def _seed(i: int, salt: int) -> int:
    return 1_000_003 * salt + i


def make_tensor_pair(name: str, shape: tuple[int, ...], idx: int, device: torch.device, delta_rms: float = 1e-3,
                     noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, fine-tune) bf16 CPU tensors for one parameter; deterministic from idx."""
    g = torch.Generator(device=device).manual_seed(_seed(idx, 7))
    if len(shape) == 1:
        base = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
        ft = base + delta_rms * 5 * torch.randn(shape, generator=g, device=device)
        return base.to(torch.bfloat16).cpu(), ft.to(torch.bfloat16).cpu()
    m, n = shape
    r = min(m, n)
    base = 0.02 * torch.randn((m, n), generator=g, device=device)
    a = torch.randn((m, r), generator=g, device=device) / math.sqrt(m)
    s = torch.arange(1, r + 1, device=device, dtype=torch.float32).pow(-0.5)
    b = torch.randn((r, n), generator=g, device=device) / math.sqrt(n)
    delta = (a * s) @ b
    del a, b
    delta *= delta_rms / delta.pow(2).mean().sqrt()
    delta += noise * delta_rms * torch.randn((m, n), generator=g, device=device)
    ft = base + delta
    return base.to(torch.bfloat16).cpu(), ft.to(torch.bfloat16).cpu()


def _tokenizer(vocab: int):
    """Word-level tokenizer over the words of deltapack's default calibration corpus, padded to `vocab` entries."""
    import re
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltapack.calib.data import default_calibration_texts

    special = ["<unk>", "<s>", "</s>"]
    counts = Counter(w for t in default_calibration_texts() for w in re.findall(r"\w+|[^\w\s]+", t))
    words = [w for w, _ in counts.most_common(vocab - len(special))]
    words += [f"<extra_{i}>" for i in range(vocab - len(special) - len(words))]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write_pair(workdir: Path, shape: Shape, device: torch.device, shard_bytes: int = 2 << 30) -> tuple[Path, Path, float]:
    """Write (or reuse) base/ and ft/ checkpoints under workdir. Returns (base, ft, seconds spent writing)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    marker = workdir / "pair.json"
    want = {"shape": shape.__dict__, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        log.info("reusing the synthetic pair in %s", workdir)
        return workdir / "base", workdir / "ft", 0.0
    t0 = time.perf_counter()
    shutil.rmtree(workdir / "base", ignore_errors=True)
    shutil.rmtree(workdir / "ft", ignore_errors=True)
    marker.unlink(missing_ok=True)
    tensors = shape.tensors()
    # shard plan first, so file names (-0000k-of-0000N) are known before writing
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, s) in enumerate(tensors):
        nbytes = math.prod(s) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    tmp = {w: workdir / f".{w}.tmp" for w in ("base", "ft")}
    for d in tmp.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    weight_map = {}
    total = 0
    for k, idxs in enumerate(shards):
        buf: dict[str, dict[str, torch.Tensor]] = {"base": {}, "ft": {}}
        for i in idxs:
            name, s = tensors[i]
            b, f = make_tensor_pair(name, s, i, device)
            buf["base"][name], buf["ft"][name] = b, f
            weight_map[name] = names[k]
            total += b.numel() * 2
        for w in ("base", "ft"):
            save_file(buf[w], str(tmp[w] / names[k]), metadata={"format": "pt"})
        log.info("shard %d/%d written (%.1f s)", k + 1, len(shards), time.perf_counter() - t0)
        del buf
        gc.collect()
    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      dtype=torch.bfloat16)
    tok = _tokenizer(shape.vocab)
    for w in ("base", "ft"):
        (tmp[w] / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(tmp[w])
        tok.save_pretrained(tmp[w])
        os.replace(tmp[w], workdir / w)
    marker.write_text(json.dumps(want))
    return workdir / "base", workdir / "ft", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"labels as in run.py (aliases: {', '.join(ALIASES)})")
    ap.add_argument("--ratio", type=float, default=None, help="target true ratio (default 16; --smoke: 8, since the "
                    "tiny shapes' norm vectors and metadata keep 1-bit methods just under 16x)")
    ap.add_argument("--out", type=Path, default=RESULTS / "parts" / "timing-7b.json")
    ap.add_argument("--workdir", type=Path, default=Path("/root/dp7b") if Path("/root").is_dir() else Path("dp7b"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; no method starts after budget - --reserve")
    ap.add_argument("--reserve", type=float, default=60.0, help="seconds a method is assumed to need at least")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (scaled-down runs)")
    ap.add_argument("--smoke", action="store_true", help="CPU, hidden 256, 2 layers: the same code path in seconds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deltapack.compress").setLevel(logging.WARNING)
    budget = Budget(args.time_budget)

    from deltapack import api
    from deltapack.compress import resolve_device
    from deltapack.errors import BudgetError
    from deltapack.methods import METHODS, get_method

    device = resolve_device("cpu" if args.smoke and args.device == "auto" else args.device)
    if args.ratio is None:
        args.ratio = 8.0 if args.smoke else 16.0
    shape = SMOKE if args.smoke else LLAMA2_7B
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    workdir = args.workdir / ("smoke" if args.smoke else "llama2-7b")
    workdir.mkdir(parents=True, exist_ok=True)
    specs = select_methods(args.methods)

    doc = {"command": command_line(), "device": device_name(device), "date": now_iso(), "smoke": bool(args.smoke),
           "shape": shape.label(), "params": shape.params(), "timing": [], "notes": [], "complete": False,
           "path": "deltapack.api.compress on sharded bf16 safetensors checkpoints (real code path)"}
    write_json(args.out, doc)
    base_dir, ft_dir, write_s = write_pair(workdir, shape, device, shard_bytes=(2 << 30) if not args.smoke else (4 << 20))
    doc["checkpoint_write_seconds"] = round(write_s, 1)
    write_json(args.out, doc)
    log.info("pair ready (%s, %.1fM params) in %.0f s", shape.label(), shape.params() / 1e6, write_s)

    skipped = False
    for spec in specs:
        ratio = None if spec.method == "raw" else args.ratio
        if spec.method not in METHODS:
            doc["notes"].append({"method": spec.label, "note": f"method {spec.method!r} not available in this build"})
            write_json(args.out, doc)
            continue
        if budget.left() < args.reserve:
            doc["notes"].append({"method": spec.label, "note": f"time budget: not started ({budget.left():.0f} s left)"})
            write_json(args.out, doc)
            skipped = True
            continue
        try:
            get_method(spec.method, spec.params)
        except Exception as e:
            doc["notes"].append({"method": spec.label, "note": f"cannot configure: {e}"})
            continue
        out = workdir / "delta"
        shutil.rmtree(out, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            api.compress(base_dir, ft_dir, out, method=spec.method, ratio=ratio, params=spec.params, device=str(device),
                         overwrite=True, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            info = api.inspect(out)
        except BudgetError as e:
            doc["notes"].append({"method": spec.label, "target_ratio": ratio, "note": f"cannot reach: {e}"})
            write_json(args.out, doc)
            continue
        except Exception as e:
            log.error("%s failed:\n%s", spec.label, traceback.format_exc())
            doc["notes"].append({"method": spec.label, "target_ratio": ratio, "note": f"error: {e.__class__.__name__}: {e}"[:500]})
            write_json(args.out, doc)
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
        rec = {
            "method": spec.method, "label": spec.label, "allocator": spec.allocator, "params": spec.params,
            "target_ratio": ratio, "seconds": round(seconds, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),  # process peak so far
            "true_ratio": info["true_ratio"], "nominal_ratio": info["nominal_ratio"], "shape": shape.label(),
        }
        doc["timing"].append(rec)
        write_json(args.out, doc)
        log.info("%s @ %s: %.1f s, peak GPU %s GB, true ratio %.2fx", spec.label,
                 "lossless" if ratio is None else f"{ratio:g}x", seconds, rec["peak_gpu_gb"], rec["true_ratio"])
    doc["complete"] = not skipped
    doc["elapsed_s"] = round(budget.elapsed(), 1)
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

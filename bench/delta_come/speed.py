"""delta-come compression time on a 7B-shaped Llama (the issue's target: <= 5 minutes on one H100, calibration included).

Writes a random 7B-shaped base (Llama-2-7B shapes: hidden 4096, 32 layers, inter 11008, vocab 32000, bf16) and a
fine-tune = base + a delta with a decaying spectrum plus noise, straight to safetensors from the GPU, then times
`deltapack.api.compress(..., method="delta-come")` with GPTQ on layer-by-layer calibration. The machine has no
tokenizer for a random model, so calibration uses random token ids (calib_source=random): the same work as text.

    python bench/delta_come/speed.py --out bench/results/delta_come_speed.json           # CUDA
    python bench/delta_come/speed.py --smoke --out /tmp/smoke.json                       # same path, tiny, CPU

Stage times come from the method's own log lines (calibration, spectra) and the driver's total.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from deltapack import api  # noqa: E402

SHAPES = {
    "7b": dict(hidden=4096, layers=32, inter=11008, vocab=32000, heads=32, kv_heads=32),
    "smoke": dict(hidden=256, layers=2, inter=688, vocab=1024, heads=4, kv_heads=4),
}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden"], c["inter"], c["vocab"]
    kv = h * c["kv_heads"] // c["heads"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for L in range(c["layers"]):
        p = f"model.layers.{L}."
        out.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return out


def write_pair(root: Path, c: dict, device: torch.device, shard_bytes: int = 2 << 30) -> tuple[Path, Path]:
    """Random base and fine-tune checkpoints, sharded, written tensor by tensor (bounded memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=c["hidden"], intermediate_size=c["inter"], num_hidden_layers=c["layers"],
                      num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    g = torch.Generator(device=device).manual_seed(0)
    dirs = (root / "base", root / "ft")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
    shards: list[tuple[dict, dict]] = [({}, {})]
    size = 0
    for name, shape in tensor_shapes(c).items():
        if len(shape) == 1:
            b = torch.ones(shape, device=device)
            f = b + 0.01 * torch.randn(shape, device=device, generator=g)
        else:
            m, n = shape
            b = 0.02 * torch.randn(m, n, device=device, generator=g)
            r = 64  # a fine-tune-like delta: a few strong directions over a noise floor
            lo = (torch.randn(m, r, device=device, generator=g) * torch.linspace(1, 0.05, r, device=device)) @ \
                torch.randn(r, n, device=device, generator=g)
            f = b + 2e-4 * lo / r**0.5 + 2e-4 * torch.randn(m, n, device=device, generator=g)
        shards[-1][0][name] = b.to(torch.bfloat16).cpu()
        shards[-1][1][name] = f.to(torch.bfloat16).cpu()
        size += shards[-1][0][name].numel() * 2
        if size >= shard_bytes:
            shards.append(({}, {}))
            size = 0
    shards = [s for s in shards if s[0]]
    for side, d in enumerate(dirs):
        wmap = {}
        for k, s in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s[side], str(d / fname), metadata={"format": "pt"})
            wmap.update({n: fname for n in s[side]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dirs


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record):
        self.lines.append((record.created, record.getMessage()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, same code path")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--budget", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--n-calib-seqs", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (needs ~30 GB for 7b)")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shape = SHAPES["smoke" if args.smoke else "7b"]
    root = Path(tempfile.mkdtemp(dir=args.workdir))
    handler = _Collect()
    logging.getLogger("deltapack").addHandler(handler)
    logging.getLogger("deltapack").setLevel(logging.INFO)
    try:
        t0 = time.time()
        base, ft = write_pair(root, shape, device)
        t_write = time.time() - t0
        params = {"quantizer": args.quantizer, "budget": args.budget, "calib_source": "random"}
        if args.smoke:
            params.update(n_calib_seqs=4, calib_seq_len=32)
        elif args.n_calib_seqs:
            params["n_calib_seqs"] = args.n_calib_seqs
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.time()
        out = api.compress(base, ft, root / "delta", method="delta-come", ratio=args.ratio, params=params,
                           device=str(device), progress=False)
        t_compress = time.time() - t1
        info = api.inspect(out)
        n_mat = sum(1 for t in info["tensors"] if t["codec"] == "factors")
        result = {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "model": "smoke" if args.smoke else "llama-7b-shaped (random)",
            "shape": shape,
            "params": params,
            "ratio_target": args.ratio,
            "true_ratio": info["true_ratio"],
            "matrices_compressed": n_mat,
            "seconds_write_checkpoints": round(t_write, 1),
            "seconds_compress_total": round(t_compress, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "log": [(round(t - t1, 1), msg) for t, msg in handler.lines if t >= t1],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
        for t, msg in result["log"]:
            print(f"{t:8.1f}s  {msg}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

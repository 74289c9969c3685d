"""delta-come variants on the real SmolLM2-135M architecture, CPU: KL(fine-tune || merged) at one ratio.

The "fine-tune" is SmolLM2-135M-Instruct plus a synthetic structured delta (rank 16 plus noise, scaled to each
matrix's weight spread), so the numbers compare the variants with one another, not with published fine-tunes; real
fine-tunes are bench/quality's job. Calibration (when a variant uses it) runs on the default stdlib-docstring corpus
through the model's own tokenizer (its first modules); the KL is measured on 1024 held-out tokens from the
corpus's last modules.

    python bench/delta_come/smollm_kl.py --base PATH/TO/SmolLM2-135M-Instruct --out bench/results/delta_come_smollm_kl.json

PATH: an HF directory or the .gguf (deltapack converts it). Needs ~2 GB RAM; about 1-3 minutes per variant on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from deltapack import api  # noqa: E402
from deltapack.calib.data import default_calibration_texts  # noqa: E402
from deltapack.io.sources import open_model  # noqa: E402

CALIB = {"n_calib_seqs": 8, "calib_seq_len": 256}
EVAL_TOKENS = 1024
VARIANTS = [
    ("lowrank", {}),
    ("delta-come", {"quantizer": "rtn", "budget": "uniform"}),
    ("delta-come", {"quantizer": "rtn", "budget": "global"}),
    ("delta-come", {"quantizer": "gptq", "budget": "uniform", **CALIB}),
    ("delta-come", {"quantizer": "gptq", "budget": "global", **CALIB}),
    ("delta-come", {"quantizer": "gptq", "svd": "whitened", **CALIB}),
    ("delta-come", {"quantizer": "gptq", "allocator": "paper", "group_size": 128, **CALIB}),
]


def make_finetune(base: Path, out: Path, seed: int = 0) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    sd = {}
    for f in sorted(base.glob("*.safetensors")):
        sd.update(load_file(f))
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if v.dim() == 2:
            m, n = v.shape
            lo = torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g) / 4
            sd[k] = (v.float() + 0.02 * v.float().std() * (lo + 0.3 * torch.randn(m, n, generator=g))).to(v.dtype)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = open_model(args.base).path
    work = Path(tempfile.mkdtemp())
    try:
        ft = work / "ft"
        make_finetune(base, ft)
        tok = AutoTokenizer.from_pretrained(str(ft))
        held_out: list[int] = []  # the corpus's last modules (calibration reads from the first): 1024 tokens
        for text in reversed(default_calibration_texts()):
            held_out = tok(text)["input_ids"] + held_out
            if len(held_out) >= EVAL_TOKENS:
                break
        ids = torch.tensor(held_out[-EVAL_TOKENS:])[None]

        def logp(model) -> torch.Tensor:
            with torch.no_grad():
                return torch.log_softmax(model(ids).logits.float(), -1)

        lp_ft = logp(AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32))

        def kl(lp: torch.Tensor) -> float:
            return float((lp_ft.exp() * (lp_ft - lp)).sum(-1).mean())

        rows = [{"variant": "base (no delta)", "kl": kl(logp(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)))}]
        print(rows[-1], flush=True)
        for method, params in VARIANTS:
            t = time.time()
            out = api.compress(base, ft, work / "delta", method=method, ratio=args.ratio, params=params,
                               device="cpu", progress=False, overwrite=True)
            seconds = time.time() - t
            model, _ = api.load_merged(base, out, dtype=torch.float32)
            rows.append({"method": method, "params": params, "kl": kl(logp(model)),
                         "true_ratio": api.inspect(out)["true_ratio"], "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
        result = {"model": str(args.base), "ratio": args.ratio, "eval_tokens": int(ids.numel()), "rows": rows,
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What the self-text step of `deltapack share` costs on this machine: time to generate N free-running texts with the
embedded SmolLM2 (the same call the pipeline makes), extrapolated to the GPU default of 8192 texts.

    PYTHONPATH=src python bench/share/self_text_cost.py --n 64      # -> bench/results/share_self_text_cost_<device>.json

Why: the pipeline turns self-text off on a CPU by default (`DEFAULT_SELF_TEXT` only on cuda); this file is the
measured reason, not an estimate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from deltapack.io.writer import write_json_atomic  # noqa: E402
from deltapack.share.data import self_text_texts  # noqa: E402
from deltapack.share.pipeline import DEFAULT_SELF_TEXT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import device_name  # noqa: E402  (bench/share/run.py: one device string for every share result file)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="texts to generate (one generate call per batch)")
    ap.add_argument("--batch", type=int, default=None, help="rows per generate call (default: the pipeline's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltapack.io.embedded import embedded_model_dir

    model_dir = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # as bench/share/run.py loads it
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval()
    t = time.perf_counter()
    texts = self_text_texts(model, tok, args.n, batch=args.batch, progress=True)
    seconds = time.perf_counter() - t
    tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts)
    res = {
        "command": " ".join(["python", *sys.argv]), "device": device_name(dev),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "n": args.n, "batch": args.batch, "texts": len(texts), "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "default_gpu_n": DEFAULT_SELF_TEXT,
        "extrapolated_seconds_for_default_n": seconds * DEFAULT_SELF_TEXT / args.n,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"share_self_text_cost_{dev.type}.json")
    write_json_atomic(out, res)
    print(f"{len(texts)} texts, {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s) on {res['device']}; "
          f"{DEFAULT_SELF_TEXT} texts would take about {res['extrapolated_seconds_for_default_n'] / 60:.0f} min. Wrote {out}")


if __name__ == "__main__":
    main()

"""Host time the engine spends turning sampled tokens into text (serve/text.py: TextStream.push, incremental
detokenization with stop strings), per decode step of 64 rows, as the outputs grow. Runs after every decode step on
the engine's thread, so on a GPU it adds to each step's time (engine.busy decode_accept_s).

SmolLM2-135M-Instruct's tokenizer (the embedded model), 64 streams each fed the tokens of this repository's README
(after a 16-token prompt) with one stop string that never occurs; mean milliseconds per step over the whole output and
over its last 100 tokens, for outputs of 128, 512 and 2048 tokens.

    PYTHONPATH=src python bench/serving/detok_speed.py --out bench/results/serving_detok_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import ROOT, record, save  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from deltapack.io.embedded import embedded_model_dir
    from deltapack.serve.text import TextStream

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    ids = tok((ROOT / "README.md").read_text() * 4)["input_ids"]
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        if 16 + length > len(ids):
            raise SystemExit(f"the text has {len(ids)} tokens, fewer than 16 + {length}")
        streams = [TextStream(tok, ids[:16], stop=["\n\n\n\n\n"]) for _ in range(args.rows)]
        per = []
        for i in range(length):
            t0 = time.perf_counter()
            for s in streams:
                s.push(ids[16 + i])
            per.append(time.perf_counter() - t0)
        rows.append({"output_tokens": length, "ms_per_step": round(sum(per) / length * 1e3, 3),
                     "ms_per_step_last_100": round(sum(per[-100:]) / min(100, length) * 1e3, 3)})
        print(rows[-1], flush=True)
    save(args.out, record("detok_speed.py", 1, rows=args.rows, tokenizer="SmolLM2-135M-Instruct", steps=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

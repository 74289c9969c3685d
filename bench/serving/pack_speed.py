"""Seconds to pack each of coldstart.py's four deltas for serving: SmolLM2-135M's shape (`--shape smollm`, coldstart.py's
models) or one decoder layer of Llama-2-7B's widths (`--shape 7b-layer`: x32 for a 7B model's layers).

By default a server packs its deltas on the host's CPU before they move to the device (serve/tiers.py: the packed
host copy is also the host tier; `serve --pack-device auto` packs on the GPU, `--work-device cuda` here), whatever
the kernels: the reference backend's layouts (a CPU server) and the Triton
backend's (a GPU server: the same CSR, re-laid out as ELL tiles, kernels/triton/layouts.py). Sparse codecs regenerate
their seeded masks there (format/masks.py), which made dare and deltadq most of the `deltas` phase of a start
(bench/results/serving.json coldstart: startup_phases.notes.deltas.pack_s). This times that packing alone, per delta
and layout, with a given number of torch threads, best of --repeat runs, shards already read and verified.

    PYTHONPATH=src python bench/serving/pack_speed.py --threads 1 --out bench/results/serving_pack_cpu.json
    PYTHONPATH=src python bench/serving/pack_speed.py --shape 7b-layer --threads 2 \
        --out bench/results/serving_pack_cpu_7b_layer.json
    (a GPU host's CPU: --threads 16 --compress-device cuda; its GPU: --work-device cuda --compress-device cuda)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltapack_coldstart"), help="models (kept, reused)")
    ap.add_argument("--shape", choices=["smollm", "7b-layer"], default="smollm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-device", default="cpu",
                    help="where the packing runs (cuda: the parts moved there first, as serve --pack-device auto)")
    ap.add_argument("--compress-device", default="cpu",
                    help="where the deltas are compressed (once; cuda on a GPU host)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from coldstart import SHAPES, TENANTS, make_models
    from cpu_bench import record, save
    from deltapack.format.directory import DeltaDir
    from deltapack.kernels.reference import ReferenceKernels
    from deltapack.kernels.triton.layouts import pack_entry

    torch.set_num_threads(args.threads)

    def sync() -> None:
        if args.work_device != "cpu":
            torch.cuda.synchronize()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.shape == "7b-layer":  # Llama-2-7B's widths, one layer, a small vocabulary: the layers dominate a 7B
        SHAPES["7b-layer"] = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=256,
                                  max_position_embeddings=512, tie_word_embeddings=False)
    _, deltas, _ = make_models(args.work, args.shape, 16.0, args.compress_device)
    ref = ReferenceKernels()
    layouts = {
        "reference": lambda c, p, parts, s: ref.pack(c, p, parts, s, dtype=torch.bfloat16, device="cpu"),
        f"triton (ELL, on the {'CPU' if args.work_device == 'cpu' else args.work_device})":
            lambda c, p, parts, s: pack_entry(c, p, parts, s, torch.bfloat16),
    }
    rows = []
    for name in TENANTS:
        d = DeltaDir.open(deltas[name])
        d.load_verified()
        try:
            for layout, pack in layouts.items():
                best = float("inf")
                for _ in range(args.repeat + (args.work_device != "cpu")):  # on a GPU, a first untimed pass
                    sync()
                    t0 = time.perf_counter()
                    for tname in d.manifest.tensors:
                        te = d.entry(tname)
                        parts = d.parts(tname)
                        parts.pop("new_rows", None)
                        parts = {k: v.to(args.work_device) for k, v in parts.items()}
                        pack(te.codec, te.params, parts, tuple(te.shape)).to("cpu")  # the host copy, as tiers keep
                    sync()
                    best = min(best, time.perf_counter() - t0)
                rows.append({"delta": name, "layout": layout, "seconds": round(best, 3)})
                print(f"{name:11s} {layout:26s} {best:7.3f} s", flush=True)
        finally:
            d.drop_verified()
    save(args.out, record("pack_speed.py", args.threads, torch=torch.__version__, shape=args.shape, ratio=16.0,
                          repeat=args.repeat, work_device=args.work_device, packs=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Lossless deltas and the entropy stage, measured on real fine-tunes: writes bench/results/lossless.json.

For each (base, fine-tune) pair:
  * `lossless` (and `dense-exact`, the old raw storage, as the merge-speed reference): true ratio, the ratio against
    the bf16 fine-tune's weights, encode seconds, decode seconds (every stored tensor rebuilt from the delta and the
    base, one CPU thread, base reads excluded) and GB/s of rebuilt fine-tune per core, merge seconds (`deltapack
    merge` to disk, base verification included), exact (every tensor of the merged checkpoint bit-identical to the
    fine-tune), and how the fine-tune's elements changed (share of bit-identical ones, of changes within 1..16
    units in the last place);
  * each lossy method at `--ratio`: true ratio with the entropy stage, the true ratio the same delta had without it,
    the saving, per part name the bytes before/after, and the order-0 entropy of the payload bytes (why a codec's
    codes do or do not compress).

CPU (results committed):
    PYTHONPATH=src python bench/lossless/run.py --cpu
  the demo's pair (deltapack demo's cached 16-step fine-tune, made if missing), a 40-step arithmetic fine-tune and a
  40-step fine-tune of decoder layers 24-29 only (bench/lossless/finetune_cpu.py), all of SmolLM2-135M-Instruct.

GPU machine, on the quality benchmark's fine-tunes (bench/quality/run.py makes WORKDIR/base and WORKDIR/ft-TASK):
    PYTHONPATH=/root/site:src python bench/lossless/run.py --base /root/dpq/base \\
        --finetune-dirs /root/dpq/ft-* --out $OUT/lossless-gpu.json
  (needs the zstandard wheel carried: zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl, 5.5 MB).
  `--methods` picks what runs (default: lossless, dense-exact and the five lossy codecs); lossy methods encode on
  `--device` (default cuda when there is one). A record is written to --out after every measurement.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from deltapack import api  # noqa: E402
from deltapack.format.directory import DeltaDir  # noqa: E402
from deltapack.io.sources import open_model  # noqa: E402

log = logging.getLogger("bench.lossless")

LOSSY = ["dare", "deltadq", "delta-come", "lowrank", "bitdelta"]
EXACT = ["lossless", "dense-exact"]
CPU_FT_STEPS = 40
PARTIAL_LAYERS = [24, 25, 26, 27, 28, 29]  # the last 6 of 30: backward stops there, a third of a full step


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def device_name(dev: str) -> str:
    if dev.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (encode); CPU {platform.machine()} {os.cpu_count()} cores (decode/merge)"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, shared)"


def weight_bytes_bf16(src) -> int:
    """Bytes of the fine-tune's weights in bf16 (what 'ratio against the bf16 fine-tune' divides)."""
    return sum(2 * math.prod(src.meta(n).shape) for n in src.keys())


def change_stats(bsrc, fsrc) -> dict:
    """Share of the fine-tune's elements bit-identical to the base, and of those within 16 units in the last place
    (same-dtype tensors; others counted as changed)."""
    same = small = total = 0
    in_base = set(bsrc.keys())
    for n in fsrc.keys():
        f = fsrc.get(n)
        total += f.numel()
        if n not in in_base:
            continue
        b = bsrc.get(n)
        if b.dtype != f.dtype or b.shape != f.shape or f.element_size() != 2:
            continue
        d = (f.view(torch.int16).int() - b.view(torch.int16).int()).abs()
        same += int((d == 0).sum())
        small += int(((d > 0) & (d <= 16)).sum())
    return {"unchanged_share": same / max(1, total), "within_16_ulp_share": small / max(1, total),
            "elements": total}


def exact_check(fsrc, merged_dir: Path) -> bool:
    m = open_model(merged_dir)
    if set(m.keys()) != set(fsrc.keys()):
        return False
    for n in fsrc.keys():
        a, b = fsrc.get(n), m.get(n)
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            return False
    return True


def decode_seconds(bsrc, d: DeltaDir) -> tuple[float, int]:
    """Seconds to rebuild every stored tensor (one thread, base tensors read before the clock), bytes rebuilt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    secs, nbytes = 0.0, 0
    try:
        for n, te in d.manifest.tensors.items():
            b = bsrc.get(n) if te.in_base else None
            if b is not None and te.base_rows is not None:
                b = b[: te.base_rows]
            t0 = time.perf_counter()
            t = d.merge_tensor(n, b)
            secs += time.perf_counter() - t0
            nbytes += t.numel() * t.element_size()
    finally:
        torch.set_num_threads(threads)
    return secs, nbytes


def part_entropy_bits(blob: np.ndarray) -> float:
    """Order-0 entropy of a byte stream, bits per byte."""
    if blob.size == 0:
        return 0.0
    c = np.bincount(blob, minlength=256).astype(np.float64)
    p = c[c > 0] / blob.size
    return float(-(p * np.log2(p)).sum())


def entropy_report(d: DeltaDir) -> dict:
    """Per part name: bytes as the codec made them, bytes stored, and the order-0 byte entropy of the original."""
    by_part: dict[str, dict] = {}
    before = after = 0
    for n, te in d.manifest.tensors.items():
        parts = d.parts(n)  # decoded: what the codec made
        for k, t in parts.items():
            orig = t.numel() * t.element_size()
            if k in te.entropy:
                stored = sum(te.entropy[k]["frames"])
            else:
                stored = orig
            key = f"{te.codec}:{k}"
            r = by_part.setdefault(key, {"bytes": 0, "stored": 0, "coded_parts": 0, "parts": 0, "_hsum": 0.0})
            r["bytes"] += orig
            r["stored"] += stored
            r["parts"] += 1
            r["coded_parts"] += int(k in te.entropy)
            r["_hsum"] += part_entropy_bits(t.contiguous().reshape(-1).view(torch.uint8).numpy()) * orig
            before += orig
            after += stored
    for r in by_part.values():
        r["byte_entropy_bits"] = round(r.pop("_hsum") / max(1, r["bytes"]), 3)
        r["saving"] = round(1 - r["stored"] / max(1, r["bytes"]), 4)
    return {"parts_bytes": before, "parts_stored": after, "saving": round(1 - after / max(1, before), 4),
            "by_part": by_part}


def measure(base: Path, ft: Path, pair: str, model: str, methods: list[str], ratio: float, device: str,
            work: Path, sink) -> None:
    bsrc, fsrc = open_model(base), open_model(ft)
    ft_bytes = weight_bytes_bf16(fsrc)
    stats = change_stats(bsrc, fsrc)
    log.info("%s: %.1f%% of elements unchanged, %.1f%% within 16 ulp", pair, 100 * stats["unchanged_share"],
             100 * stats["within_16_ulp_share"])
    for method in methods:
        out = work / f"{pair}-{method}"
        exact_method = method in EXACT
        rec: dict = {"model": model, "pair": pair, "method": method, "finetune": str(ft), "base": str(base),
                     **stats, "finetune_bf16_bytes": ft_bytes}
        try:
            t0 = time.perf_counter()
            api.compress(base, ft, out, method=method, ratio=None if exact_method else ratio, overwrite=True,
                         device="cpu" if exact_method else device, progress=False)
            rec["encode_s"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # a method that cannot run here is recorded, the rest go on
            log.warning("%s %s failed: %s", pair, method, e)
            rec["error"] = f"{type(e).__name__}: {e}"
            sink(rec)
            continue
        d = DeltaDir.open(out)
        info = api.inspect(out)
        rec.update(true_ratio=round(info["true_ratio"], 4), delta_bytes=info["total_bytes"],
                   ratio_vs_finetune=round(ft_bytes / info["total_bytes"], 4),
                   dense_delta_bytes=info["dense_delta_bytes"], changed_tensors=info["changed_tensors"])
        dec_s, dec_bytes = decode_seconds(bsrc, d)
        rec.update(decode_s=round(dec_s, 3), decode_gb_per_s_per_core=round(dec_bytes / max(dec_s, 1e-9) / 1e9, 3))
        if exact_method:
            merged = work / f"{pair}-{method}-merged"
            t0 = time.perf_counter()
            api.merge(base, out, merged, overwrite=True, progress=False)
            rec["merge_s"] = round(time.perf_counter() - t0, 2)
            rec["exact"] = exact_check(fsrc, merged)
            shutil.rmtree(merged, ignore_errors=True)
        else:
            rec["exact"] = False
            rec["target_ratio"] = ratio
            ent = entropy_report(d)
            rec["entropy_stage"] = ent
            # the same delta without the stage: every coded part at its original size
            rec["true_ratio_without_entropy"] = round(
                info["dense_delta_bytes"] / (info["total_bytes"] + ent["parts_bytes"] - ent["parts_stored"]), 4)
            rec["entropy_saving_on_disk"] = round(
                (ent["parts_bytes"] - ent["parts_stored"]) / (info["total_bytes"] + ent["parts_bytes"] - ent["parts_stored"]), 4)
        shutil.rmtree(out, ignore_errors=True)
        log.info("%s %s: %s", pair, method, {k: v for k, v in rec.items() if k != "entropy_stage"})
        sink(rec)


def cpu_pairs(work: Path) -> list[tuple[Path, Path, str]]:
    """(base, fine-tune, label) of the committed CPU results; fine-tunes are made once and cached."""
    from deltapack.demo import RECIPE, make_demo_finetune
    from deltapack.io.embedded import embedded_model_dir
    from deltapack.io.gguf import cache_root

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from finetune_cpu import make_finetune

    base = embedded_model_dir()
    demo = cache_root() / "demo" / f"finetune-{RECIPE}-16steps"
    if not (demo / "model.safetensors").exists():
        make_demo_finetune(base, demo, 16)
    root = cache_root() / "lossless"
    full = root / f"ft-arithmetic-{CPU_FT_STEPS}"
    if not (full / "finetune.json").exists():
        make_finetune(base, full, steps=CPU_FT_STEPS)
    part = root / f"ft-arithmetic-{CPU_FT_STEPS}-layers24-29"
    if not (part / "finetune.json").exists():
        make_finetune(base, part, steps=CPU_FT_STEPS, layers=PARTIAL_LAYERS)
    return [(base, demo, "demo-16steps"), (base, full, f"arithmetic-{CPU_FT_STEPS}steps-cpu"),
            (base, part, f"arithmetic-{CPU_FT_STEPS}steps-cpu-layers24-29")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the committed CPU set (demo pair + two CPU fine-tunes)")
    ap.add_argument("--finetune-dirs", nargs="+", type=Path, default=None, help="fine-tune checkpoint dirs")
    ap.add_argument("--base", type=Path, default=None, help="their base checkpoint dir (with --finetune-dirs)")
    ap.add_argument("--methods", default=",".join(EXACT + LOSSY))
    ap.add_argument("--ratio", type=float, default=16.0, help="target ratio of the lossy methods")
    ap.add_argument("--device", default=None, help="encode device of the lossy methods (default: cuda if present)")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lossless.json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if bool(a.cpu) == bool(a.finetune_dirs):
        ap.error("pass --cpu or --finetune-dirs DIR [DIR...] --base PATH")
    if a.finetune_dirs and a.base is None:
        ap.error("--finetune-dirs needs --base")
    if a.base is not None and not (a.base / "config.json").is_file():
        ap.error(f"--base {a.base}: not a checkpoint directory (no config.json)")
    for f in a.finetune_dirs or []:
        if not (f / "config.json").is_file():
            ap.error(f"--finetune-dirs {f}: not a checkpoint directory (no config.json)")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dp-lossless-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = cpu_pairs(work) if a.cpu else [(a.base, f, f.name) for f in a.finetune_dirs]
    doc = {"command": " ".join(["python", *sys.argv]), "device": device_name(device), "date": now_iso(),
           "torch": torch.__version__, "zstandard": _zstd_version(), "ratio": a.ratio, "records": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def sink(rec: dict) -> None:
        doc["records"].append(rec)
        tmp = a.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, a.out)

    for base, ft, label in pairs:
        measure(base, ft, label, a.model, methods, a.ratio, device, work, sink)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}: {len(doc['records'])} records")
    return 0


def _zstd_version() -> str:
    import zstandard

    return zstandard.__version__


if __name__ == "__main__":
    raise SystemExit(main())

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
  `--device` (default cuda when there is one). A record is written to --out after every measurement, so a call cut
  at its time limit keeps what it measured; `--append` adds to an existing --out. The exact methods take about a
  minute per fine-tune (dense-exact's merge is most of it), so for six tasks within one 10-minute call:
      ... --methods lossless --no-study            (then, if time is left, a second call with --append and
      ... --methods dense-exact,dare,lowrank,bitdelta,deltadq,delta-come --no-study --append)
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


def decode_seconds(bsrc, d: DeltaDir) -> tuple[float, float, int]:
    """Wall and CPU seconds to rebuild every stored tensor (one thread, base tensors read before the clock), bytes
    rebuilt. The CPU time is what 'per core' means on a shared machine, where the wall clock also counts the time
    other processes held the core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    secs, cpu, nbytes = 0.0, 0.0, 0
    try:
        for n, te in d.manifest.tensors.items():
            b = bsrc.get(n) if te.in_base else None
            if b is not None and te.base_rows is not None:
                b = b[: te.base_rows]
            t0, c0 = time.perf_counter(), time.thread_time()
            t = d.merge_tensor(n, b)
            secs += time.perf_counter() - t0
            cpu += time.thread_time() - c0
            nbytes += t.numel() * t.element_size()
    finally:
        torch.set_num_threads(threads)
    return secs, cpu, nbytes


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


def _h0(a: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol."""
    c = np.bincount(a.ravel()).astype(np.float64)
    p = c[c > 0] / a.size
    return float(-(p * np.log2(p)).sum())


def codec_study(bsrc, fsrc, max_tensors: int = 12) -> dict:
    """What the codec choice rests on, on a sample of changed 16-bit tensors (the embedding and one layer's matrices
    at the start, middle and end of the changed layers): stored bytes of XOR vs zigzagged integer difference, byte planes vs the raw words, zstd
    levels 1/3/19, with and without the changed-element bitmap; the order-0 entropy of the planes (what an ideal
    order-0 coder such as ANS would reach) and of the 16-bit difference given the base's exponent (what a
    context model would reach); single-core speed of the zstd frames alone and of the codec's whole rebuild (planes
    joined, unzigzagged, added to the base)."""
    from deltapack.format import entropy
    from deltapack.format.codec_lossless import encode_bits, rebuild_bits, zigzag

    in_base = set(bsrc.keys())
    names = [n for n in fsrc.keys() if n in in_base and fsrc.meta(n).dtype in (torch.bfloat16, torch.float16)
             and fsrc.meta(n).shape == bsrc.meta(n).shape and not torch.equal(fsrc.get(n), bsrc.get(n))]
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
    pick = [layers[0], layers[len(layers) // 2], layers[-1]] if layers else []
    sample = [n for n in names if "embed" in n] + [n for n in names if any(f".layers.{i}." in n for i in pick)
                                                    and len(fsrc.meta(n).shape) == 2]
    sample = sample[:max_tensors]
    tot: dict[str, float] = {}

    def add(k, v):
        tot[k] = tot.get(k, 0.0) + v

    dec_s = reb_s = dec_bytes = 0.0
    for n in sample:
        b, f = bsrc.get(n), fsrc.get(n)
        bw = b.contiguous().view(torch.int16).numpy().view(np.uint16).ravel()
        fw = f.contiguous().view(torch.int16).numpy().view(np.uint16).ravel()
        N = fw.size
        add("elements", N)
        zz = zigzag(fw - bw)
        variants = {"xor": bw ^ fw, "sub": fw - bw, "sub_zigzag": zz}
        for name, v in variants.items():
            lo, hi = (v & 0xFF).astype(np.uint8), (v >> 8).astype(np.uint8)
            add(f"{name}_planes_entropy_bytes", (_h0(lo) + _h0(hi)) * N / 8)
            for lvl in (1, 3) if name != "sub_zigzag" else (1, 3, 19):
                blob, _ = entropy.encode_planes(v, True, lvl)
                add(f"{name}_planes_zstd{lvl}_bytes", len(blob))
            blob, _ = entropy.encode_planes(v, False, 1)
            add(f"{name}_words_zstd1_bytes", len(blob))
        add("sub_zigzag_16bit_entropy_bytes", _h0(zz) * N / 8)
        expo = ((bw >> 7) & 0xFF) if f.dtype == torch.bfloat16 else ((bw >> 10) & 0x1F)
        cond = sum(_h0(zz[expo == e]) * int((expo == e).sum()) for e in np.unique(expo))
        add("sub_zigzag_given_base_exponent_entropy_bytes", cond / 8)
        p_plain, parts_plain = encode_bits(f, b, bitmap=False)
        p_map, parts_map = encode_bits(f, b, bitmap=True)
        add("lossless_no_bitmap_bytes", sum(t.numel() for t in parts_plain.values()))
        add("lossless_bitmap_bytes", sum(t.numel() for t in parts_map.values()))
        blob = parts_plain["planes"].numpy()
        t0 = time.thread_time()
        for _ in entropy.iter_frames(blob, p_plain["frames"], N, 2, True):
            pass
        t1 = time.thread_time()
        rebuilt = rebuild_bits(p_plain, parts_plain, f.shape, b)
        t2 = time.thread_time()
        assert torch.equal(rebuilt.view(torch.int16), f.view(torch.int16))
        dec_s += t1 - t0
        reb_s += t2 - t1
        dec_bytes += 2 * N
    bf16 = 2 * tot.get("elements", 0)
    ratios = {k.replace("_bytes", ""): round(bf16 / v, 3) for k, v in tot.items() if k.endswith("_bytes") and v}
    return {"tensors": sample, "bf16_bytes": int(bf16), "ratio_vs_bf16": ratios,
            # CPU time of this thread: GB of fine-tune (bf16) out per second of one core
            "zstd_planes_decode_gb_per_s_per_core": round(dec_bytes / max(dec_s, 1e-9) / 1e9, 3),
            "codec_rebuild_gb_per_s_per_core": round(dec_bytes / max(reb_s, 1e-9) / 1e9, 3)}


def measure(base: Path, ft: Path, pair: str, model: str, methods: list[str], ratio: float, device: str,
            work: Path, sink, study: bool = True) -> None:
    bsrc, fsrc = open_model(base), open_model(ft)
    ft_bytes = weight_bytes_bf16(fsrc)
    stats = change_stats(bsrc, fsrc)
    log.info("%s: %.1f%% of elements unchanged, %.1f%% within 16 ulp", pair, 100 * stats["unchanged_share"],
             100 * stats["within_16_ulp_share"])
    if study:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            st = codec_study(bsrc, fsrc)
        finally:
            torch.set_num_threads(threads)
        log.info("%s codec study: %s", pair, st["ratio_vs_bf16"])
        sink({"model": model, "pair": pair, "method": "codec-study", **st})
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
        from deltapack.format.directory import dir_bytes

        # the fine-tune's own config/tokenizer files where their bytes differ from the base's: part of the delta,
        # but not of the weights
        hf = dir_bytes(out / "hf") if (out / "hf").is_dir() else 0
        rec.update(hf_bytes=hf, true_ratio_weights_only=round(info["dense_delta_bytes"] / max(1, info["total_bytes"] - hf), 4))
        rec.update(true_ratio=round(info["true_ratio"], 4), delta_bytes=info["total_bytes"],
                   ratio_vs_finetune=round(ft_bytes / info["total_bytes"], 4),
                   dense_delta_bytes=info["dense_delta_bytes"], changed_tensors=info["changed_tensors"])
        dec_s, dec_cpu, dec_bytes = decode_seconds(bsrc, d)
        rec.update(decode_s=round(dec_s, 3), decode_cpu_s=round(dec_cpu, 3),
                   decode_gb_per_s_per_core=round(dec_bytes / max(dec_cpu, 1e-9) / 1e9, 3),
                   decode_gb_per_s_wall=round(dec_bytes / max(dec_s, 1e-9) / 1e9, 3))
        if exact_method:
            merged = work / f"{pair}-{method}-merged"
            t0, c0 = time.perf_counter(), time.process_time()
            api.merge(base, out, merged, overwrite=True, progress=False)
            rec["merge_s"] = round(time.perf_counter() - t0, 2)
            rec["merge_cpu_s"] = round(time.process_time() - c0, 2)  # all threads of this process
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


def cpu_pairs(which: list[str]) -> list[tuple[Path, Path, str]]:
    """(base, fine-tune, label) of the committed CPU results (`which`: demo, full, layers); fine-tunes are made once
    and cached."""
    from deltapack.demo import demo_pair
    from deltapack.io.embedded import embedded_model_dir
    from deltapack.io.gguf import cache_root

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from finetune_cpu import make_finetune

    base = embedded_model_dir()
    out = []
    if "demo" in which:
        out.append((base, demo_pair(16)[1], "demo-16steps"))
    root = cache_root() / "lossless"
    if "full" in which:
        full = root / f"ft-arithmetic-{CPU_FT_STEPS}"
        if not (full / "finetune.json").exists():
            make_finetune(base, full, steps=CPU_FT_STEPS)
        out.append((base, full, f"arithmetic-{CPU_FT_STEPS}steps-cpu"))
    if "layers" in which:
        part = root / f"ft-arithmetic-{CPU_FT_STEPS}-layers24-29"
        if not (part / "finetune.json").exists():
            make_finetune(base, part, steps=CPU_FT_STEPS, layers=PARTIAL_LAYERS)
        out.append((base, part, f"arithmetic-{CPU_FT_STEPS}steps-cpu-layers24-29"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the committed CPU set (demo pair + two CPU fine-tunes)")
    ap.add_argument("--cpu-pairs", default="demo,full,layers", help="with --cpu: which of demo, full, layers")
    ap.add_argument("--append", action="store_true", help="keep the records already in --out (one run per pair)")
    ap.add_argument("--finetune-dirs", nargs="+", type=Path, default=None, help="fine-tune checkpoint dirs")
    ap.add_argument("--base", type=Path, default=None, help="their base checkpoint dir (with --finetune-dirs)")
    ap.add_argument("--methods", default=",".join(EXACT + LOSSY))
    ap.add_argument("--ratio", type=float, default=16.0, help="target ratio of the lossy methods")
    ap.add_argument("--device", default=None, help="encode device of the lossy methods (default: cuda if present)")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--no-study", action="store_true", help="skip the codec study (XOR vs difference, levels, bitmap)")
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
    pairs = cpu_pairs(a.cpu_pairs.split(",")) if a.cpu else [(a.base, f, f.name) for f in a.finetune_dirs]
    run = {"command": " ".join(["python", *sys.argv]), "device": device_name(device), "date": now_iso(),
           "torch": torch.__version__, "zstandard": _zstd_version(), "ratio": a.ratio}
    doc = {**run, "runs": [run], "records": []}
    if a.append and a.out.is_file():
        old = json.loads(a.out.read_text())
        doc["runs"] = old.get("runs", []) + [run]
        doc["records"] = old.get("records", [])
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def sink(rec: dict) -> None:
        doc["records"].append({**rec, "run": len(doc["runs"]) - 1})
        tmp = a.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, a.out)

    for base, ft, label in pairs:
        measure(base, ft, label, a.model, methods, a.ratio, device, work, sink, study=not a.no_study)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}: {len(doc['records'])} records")
    return 0


def _zstd_version() -> str:
    import zstandard

    return zstandard.__version__


if __name__ == "__main__":
    raise SystemExit(main())

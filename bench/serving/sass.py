"""Compile the Triton delta kernels for a Hopper GPU on this machine (no GPU needed) and report what the compiler
made of them: registers, spill stack, and the instructions of each kernel's hot loops per packed code.

    PYTHONPATH=src python bench/serving/sass.py                 # every launch variant the backend uses
    PYTHONPATH=src python bench/serving/sass.py --only decode   # names containing "decode"
    PYTHONPATH=src python bench/serving/sass.py --json out.json

Triton ships ptxas and cuobjdump, so `triton.compile(..., target=GPUTarget("cuda", 90, 32))` runs end to end on a CPU
machine. A variant that fails to compile here would fail on the GPU too (the CPU interpreter the tests use accepts
things the compiler rejects). "instr/code" divides the instructions of the innermost loop by the codes one thread
decodes per iteration (rows x K step / threads): a memory-bound decode of b-bit codes at the H100's ~3 TB/s needs
about 128 / (codes per SM-clock at that rate) instructions or fewer: ~2.5 for 2-bit codes, ~1.2 for 1-bit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deltapack.kernels.triton import (  # noqa: E402
    MODE_COL, MODE_ELEM_COL, MODE_ELEM_ROW, MODE_ROW, MODE_ROWTILE, MODE_UNIT, POST_U, POST_V, LaunchConfig,
)
from deltapack.kernels.triton import kernels as K  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
SEG_SIG = {
    "x_ptr": "*bf16", "stride_x": "i32", "out_ptr": "*fp32", "stride_o": "i32", "order_ptr": "*i32",
    "blk_slot_ptr": "*i32", "blk_start_ptr": "*i32", "blk_len_ptr": "*i32", "ptr_tab": "*i64", "tile_tab": "*i32",
    "seg_tab": "*i32", "NT": "i32", "NSEG": "i32", "ccol": "i32", "SPLIT_K": "i32",
}
ELL_SIG = {
    "x_ptr": "*bf16", "stride_x": "i32", "out_ptr": "*bf16", "stride_o": "i32", "order_ptr": "*i32",
    "blk_slot_ptr": "*i32", "blk_start_ptr": "*i32", "blk_len_ptr": "*i32", "ptr_tab": "*i64", "M": "i32",
    "SPLIT_J": "i32",
}
DELTA_COME = (1 << 2) | (1 << 3) | (1 << 8)  # widths of delta-come's paper recipe: 8, 3, 2 bits
# MODES bit masks of a launch (the backend sets bit m when a segment has scale mode m)
ROW, ROWTILE, COL, UNIT = 1 << MODE_ROW, 1 << MODE_ROWTILE, 1 << MODE_COL, 1 << MODE_UNIT
ELEM = (1 << MODE_ELEM_ROW) | (1 << MODE_ELEM_COL)


def variants(cfg: LaunchConfig) -> list[dict]:
    """The launch variants of the backend (see TritonKernels._run_seg / _run_ell), named by role."""
    out = []

    def seg(name, bt, widths, modes, *, x="*bf16", sign=False, scf32=False, split=1, fdt=tl.bfloat16, xdt=tl.bfloat16,
            ieee=False, post=0):
        dot = bt > cfg.bcast_max_tokens
        # K step of 2-bit codes (the per-code figures are per 2-bit code; other widths step by the same words)
        bk = cfg.block_k_dot if dot else min(cfg.block_k, cfg.words_per_step * 16)
        warps = cfg.warps(dot, widths)
        if dot and xdt == tl.float32:
            bk = min(bk, 32)
        out.append({
            "name": name, "fn": K._seg_kernel, "sig": dict(SEG_SIG, x_ptr=x), "warps": warps,
            "maxnreg": cfg.max_registers_dot if dot else cfg.max_registers,
            "codes_per_thread": cfg.block_r * bk / (32 * warps),
            "const": {"BLOCK_T": bt, "BLOCK_R": cfg.block_r, "BLOCK_K": bk, "BLOCK_F": cfg.block_f,
                      "WIDTHS": widths, "MODES": modes, "SIGN": sign, "SC_F32": scf32, "FDT": fdt, "XDT": xdt,
                      "DOT": dot, "UPCAST": False, "IEEE": ieee, "ATOMIC": split > 1, "POST": post,
                      "WORDS": cfg.words_per_step},
        })

    for bt in (1, 2, 16):
        seg(f"delta-come V side, {bt} token(s)/tenant", bt, DELTA_COME, ROW, post=POST_V)
        seg(f"delta-come U side, {bt} token(s)/tenant", bt, DELTA_COME, UNIT, x="*fp32", post=POST_U)
    seg("delta-come U side, grouped B scales (COL), 1 token", 1, DELTA_COME, COL, x="*fp32")
    seg("2-bit V side, decode 1 token", 1, 1 << 2, ROW)
    seg("2-bit U side, decode 1 token", 1, 1 << 2, COL, x="*fp32")
    seg("2-bit V side, decode 2 tokens", 2, 1 << 2, ROW)
    seg("2-bit V side, 128-col groups (ROWTILE), decode 1", 1, 1 << 2, ROWTILE)
    seg("2-bit V side, 128-col groups (ROWTILE), 16 tokens", 16, 1 << 2, ROWTILE)
    seg("all widths, general scales (ELEM), decode 1", 1, 0x1FE, ELEM | ROW)
    seg("all widths, general scales (ELEM), 16 tokens", 16, 0x1FE, ELEM | COL, x="*fp32")
    for bt in (1, 2, 16):
        seg(f"lowrank (16-bit) V side, {bt} token(s)/tenant", bt, 1, 1)
    seg("lowrank (16-bit) U side, decode 1", 1, 1, 1, x="*fp32")
    for bt in (1, 2, 16):
        seg(f"bitdelta (sign) + dense, {bt} token(s)/tenant", bt, 1 | 2, 1 | ROW, sign=True, scf32=True)
    seg("delta-come V side, split 4 (atomic)", 1, DELTA_COME, ROW, split=4)
    seg("fp16 model, delta-come V side, 16 tokens", 16, DELTA_COME, ROW, x="*fp16", fdt=tl.float16, xdt=tl.float16)
    seg("fp32 model, delta-come V side, 16 tokens", 16, DELTA_COME, ROW, x="*fp32", fdt=tl.float32, xdt=tl.float32,
        ieee=True)
    for bt in (1, 2, 16):
        bj = min(64, max(8, 4096 // (16 * bt)))
        out.append({
            "name": f"sparse (ELL), {bt} token(s)/tenant", "fn": K._ell_kernel, "sig": ELL_SIG, "warps": cfg.num_warps,
            "maxnreg": cfg.max_registers,
            "codes_per_thread": 16 * bj / (32 * cfg.num_warps),
            "const": {"BLOCK_T": bt, "BLOCK_J": bj, "ROWS": 16, "COL32": False, "FDT": tl.bfloat16,
                      "UPCAST": False, "ATOMIC": False},
        })
    return out


def compile_variant(v: dict, workdir: Path) -> dict:
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn=v["fn"], signature=v["sig"], constexprs=v["const"]), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": v["warps"], **({"maxnreg": v["maxnreg"]} if v.get("maxnreg") else {})})
    cubin = workdir / "k.cubin"
    cubin.write_bytes(k.asm["cubin"])
    res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    parsed = [g for g in (LINE.search(line) for line in sass.splitlines()) if g]
    ins = [(int(g.group(1), 16), g.group(3)) for g in parsed]
    loops = set()
    for g in parsed:  # a backward branch closes a loop
        if g.group(3).startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", g.group(4))
            a = int(g.group(1), 16)
            if t and int(t.group(1), 16) < a:
                loops.add((int(t.group(1), 16), a))
    inner = sorted(loops, key=lambda r: r[1] - r[0])
    hot = []
    for lo, hi in inner[:3]:
        body = [op.split(".")[0] for a, op in ins if lo <= a <= hi]
        c = collections.Counter(body)
        hot.append({"instructions": len(body), "per_code": round(len(body) / v["codes_per_thread"], 2),
                    "top": dict(c.most_common(8))})
    return {
        "name": v["name"], "seconds": round(time.perf_counter() - t0, 1), "registers": int(m.group(1)) if m else None,
        "stack": int(m.group(2)) if m else None, "instructions": len(ins), "hot_loops": hot,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="compile only variants whose name contains this")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()
    cfg = LaunchConfig()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as d:
        for v in variants(cfg):
            if args.only and args.only not in v["name"]:
                continue
            try:
                r = compile_variant(v, Path(d))
            except Exception as e:  # report and go on: one broken variant should not hide the others
                failed += 1
                r = {"name": v["name"], "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            rows.append(r)
            if "error" in r:
                print(f"FAIL {r['name']}: {r['error'][:400]}", flush=True)
                continue
            h = r["hot_loops"][0] if r["hot_loops"] else {}
            print(f"{r['name']:58s} regs {r['registers']:3d} stack {r['stack']:4d}  innermost loop "
                  f"{h.get('instructions', 0):5d} instr = {h.get('per_code', 0):5.1f}/code  ({r['seconds']}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"target": "sm_90", "config": vars(cfg), "variants": rows}, indent=1))
    if failed:
        sys.exit(f"{failed} variant(s) failed to compile")


if __name__ == "__main__":
    main()

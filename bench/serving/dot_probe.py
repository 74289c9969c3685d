"""Probe: how fast can a few-tokens-per-tenant (tensor-core) quantized matmul go with an interleaved code layout?

Standalone (torch + triton only). A row's codes of one power-of-two width W (NPW = 32 / W per word) are stored in
groups of LANES words; in a group, slot j (bits j*W) of lane l holds column j*LANES + l, so decoding one slot of a
(rows, LANES) word tile yields codes of LANES *contiguous* columns: no register shuffle to reach a contiguous tile,
and the matching x is a contiguous load. Variants time the V side of a 7B delta (rows = rank, K = 4096) for k
tenants with `tokens` tokens each, against the copy rate:

    python bench/serving/dot_probe.py --out /root/out/dot_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl


def pack_interleaved(codes: torch.Tensor, W: int, lanes: int) -> torch.Tensor:
    """codes (rows, K) ints < 2^W, K a multiple of lanes * 32 / W -> (rows, K * W / 32) int32."""
    rows, K = codes.shape
    npw = 32 // W
    g = lanes * npw
    c = codes.to(torch.int64).view(rows, K // g, npw, lanes)  # [r, group, slot, lane] = column slot*lanes+lane
    sh = (torch.arange(npw, dtype=torch.int64, device=codes.device) * W).view(1, 1, npw, 1)
    w = (c << sh).sum(2)  # (rows, groups, lanes)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w.reshape(rows, -1).contiguous()


@triton.jit
def probe_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, R, T_PER, NGROUPS, SPLIT,
                 W: tl.constexpr, LANES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                 VARIANT: tl.constexpr, PREFETCH: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    NPW: tl.constexpr = 32 // W
    G: tl.constexpr = LANES * NPW
    MASK: tl.constexpr = (1 << W) - 1
    wpr = K // NPW
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < R
    tt = tl.arange(0, BLOCK_T)
    tmask = tt < T_PER
    tok = (pid_b * T_PER + tt).to(tl.int64)
    ll = tl.arange(0, LANES)
    wbase = w_ptr + pid_b.to(tl.int64) * R * wpr + rr[:, None].to(tl.int64) * wpr + ll[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    sx = tl.zeros([BLOCK_T, LANES], dtype=tl.float32)
    g = pid_k
    w = tl.load(wbase + g * LANES, mask=rmask[:, None] & (g < NGROUPS), other=0)
    for g in range(pid_k, NGROUPS, SPLIT):
        if PREFETCH:
            wn = tl.load(wbase + (g + SPLIT) * LANES, mask=rmask[:, None] & (g + SPLIT < NGROUPS), other=0)
        else:
            w = tl.load(wbase + g * LANES, mask=rmask[:, None], other=0)
        xrow = x_ptr + tok[:, None] * K + g * G
        if VARIANT == 0:  # one dot per slot, codes on the left (rows x LANES) @ (LANES x tokens)
            for j in tl.static_range(NPW):
                q = (((w >> (j * W)) & MASK) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                xj = tl.load(xrow + j * LANES + ll[None, :], mask=tmask[:, None], other=0.0)
                sx += xj.to(tl.float32)
                acc += tl.dot(q, tl.trans(xj))
        elif VARIANT == 1:  # one dot per slot, tokens on the left
            for j in tl.static_range(NPW):
                q = (((w >> (j * W)) & MASK) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                xj = tl.load(xrow + j * LANES + ll[None, :], mask=tmask[:, None], other=0.0)
                sx += xj.to(tl.float32)
                acc2 += tl.dot(xj, tl.trans(q))
        elif VARIANT == 2:  # the whole group as one (rows x G) tile: 3-D shift, reshape, one dot
            jj = tl.arange(0, NPW)
            q3 = (w[:, None, :] >> (jj * W)[None, :, None]) & MASK
            q = tl.reshape((q3 | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True), (BLOCK_R, G))
            cc = tl.arange(0, G)
            xg = tl.load(xrow + cc[None, :], mask=tmask[:, None], other=0.0)
            sx += tl.sum(tl.reshape(xg.to(tl.float32), (BLOCK_T, NPW, LANES)), axis=1)
            acc += tl.dot(q, tl.trans(xg))
        else:  # memory only: sum the words (what the loads alone cost)
            acc += tl.sum(w.to(tl.float32), axis=1)[:, None]
        if PREFETCH:
            w = wn
    if VARIANT == 1:
        acc = tl.trans(acc2)
    s = tl.load(s_ptr + pid_b * R + rr, mask=rmask, other=0.0)
    z = tl.load(z_ptr + pid_b * R + rr, mask=rmask, other=0.0)
    xs = tl.sum(sx, axis=1)
    res = (acc - 128.0 * xs[None, :]) * s[:, None] + xs[None, :] * z[:, None]
    optr = out_ptr + tok[None, :] * R + rr[:, None]
    tl.atomic_add(optr, res, mask=rmask[:, None] & tmask[None, :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--R", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    dev = "cuda"
    K, R, k, tpt, W = args.K, args.R, args.k, args.tokens, 2
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(20):
        dst.copy_(src)
    en.record()
    torch.cuda.synchronize()
    copy_gbps = 2 * src.numel() * 20 / (st.elapsed_time(en) / 1e3) / 1e9
    del src, dst

    tenant_bytes = R * K * W // 8
    sets = max(1, -(-200_000_000 // (k * tenant_bytes)))
    codes = torch.randint(0, 1 << W, (k, R, K), device=dev)
    scale = (torch.rand(k, R, device=dev) * 0.01 + 0.001)
    zero = -scale * 1.5
    x = torch.randn(k * tpt, K, device=dev).to(torch.bfloat16)
    ref = torch.einsum("tk,trk->tr", x.float().view(k, tpt, K).reshape(k * tpt, K),
                       (codes.float() * scale[..., None] + zero[..., None]).repeat_interleave(tpt, 0))
    records = []
    for lanes in (16, 32):
        G = lanes * 32 // W
        words = pack_interleaved(codes.view(k * R, K), W, lanes).view(k, R, -1)
        wsets = [words.clone() for _ in range(sets)]
        ngroups = K // G
        for variant in (0, 1, 2, 3):
            for block_r in (64, 128):
                for warps in (4, 8):
                    for prefetch in (False, True):
                        for ppsm in (4, 8):
                            programs = k * triton.cdiv(R, block_r)
                            split = max(1, min(ngroups, sms * ppsm // programs))
                            out = torch.zeros(k * tpt, R, device=dev)
                            cfg = dict(lanes=lanes, variant=variant, block_r=block_r, warps=warps,
                                       prefetch=prefetch, programs_per_sm=ppsm, split=split)

                            def launch(ws, o):
                                probe_kernel[(k, triton.cdiv(R, block_r), split)](
                                    x, ws, scale, zero, o, K, R, tpt, ngroups, split, W=W, LANES=lanes,
                                    BLOCK_T=16, BLOCK_R=block_r, VARIANT=variant, PREFETCH=prefetch,
                                    num_warps=warps, num_stages=1)
                            try:
                                launch(words, out)
                                torch.cuda.synchronize()
                            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
                                records.append({**cfg, "error": str(e)[-300:]})
                                continue
                            err = float((out - ref).norm() / ref.norm()) if variant != 3 else None
                            outs = [torch.zeros_like(out) for _ in range(sets)]
                            gph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(gph):
                                for ws, o in zip(wsets, outs):
                                    o.zero_()
                                    launch(ws, o)
                            gph.replay()
                            torch.cuda.synchronize()
                            times = []
                            for _ in range(5):
                                st.record()
                                gph.replay()
                                en.record()
                                torch.cuda.synchronize()
                                times.append(st.elapsed_time(en) / 1e3 / sets)
                            t = sorted(times)[2]
                            gbps = k * tenant_bytes / t / 1e9
                            rec = {**cfg, "us": round(t * 1e6, 2), "gbps": round(gbps, 1),
                                   "efficiency": round(gbps / copy_gbps, 3), "rel_err": err}
                            records.append(rec)
                            print(json.dumps(rec), flush=True)
    out = {"command": "python bench/serving/dot_probe.py " + " ".join(f"--{a} {v}" for a, v in vars(args).items()),
           "device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "copy_gbps": round(copy_gbps, 1),
           "shape": {"K": K, "R": R, "k": k, "tokens_per_tenant": tpt, "bits": W, "bytes": k * tenant_bytes},
           "note": "each timing includes one zero-fill of the fp32 output (as the kernels' split-K launches do)",
           "records": records}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

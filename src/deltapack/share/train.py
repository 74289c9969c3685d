"""Distillation of the deltas with progressive module replacement (PMR), checkpoints and resume.

Loss per step: (1 − α)·LM + α·KL(teacher ‖ student), teacher = the original model, which is the same network with
every dependent block switched to its original weights (no second copy of the model is held). Default α = 1:
the LM gradient (p_s − onehot) stays O(1) per token even when the student matches the teacher, so any LM weight
pulls the student away from the original on the training text; the goal here is to keep the original's behaviour.

PMR: dependent blocks are ordered deepest first (k = 0 is the deepest). During the first `replace_frac` of the steps
(T_r steps, default 30%) block k runs its compressed form with probability p_k(t) = clip(2·t/T_r − k/(n−1), 0, 1),
else its original weights; so the deepest block ramps 0→1 over the first half of T_r and the shallowest over the
second half. After T_r every block is compressed. A block left original in a step gets no gradient in that step.
(30% rather than longer: after stage 0 the compressed blocks already work, and the final quality is set by the
fully compressed phase.)

Stage 0 (our addition, `local_steps` > 0): before the end-to-end distillation, each dependent block is fitted on
its own so that its contribution (output − input) on the original model's hidden states matches the original
block's: min ‖f_shared(x) − f_orig(x)‖² / ‖f_orig(x) − x‖², Adam, `local_steps` steps over `local_windows`
windows. Adjacent blocks' weights are nearly uncorrelated, so the truncated SVD of W_l − W_a explains little
of W_l and the SVD-initialised block is often worse than no block at all; the local fit is cheap (one block
forward/backward per step) and gives the end-to-end stage a working network to start from. The benchmark records
the held-out KL after each stage.

Optimiser: AdamW on the deltas (fp32 masters; the forward rounds W_a + A·B to the model's dtype), linear warmup
over `warmup_frac` of the steps, cosine decay to `min_lr_frac`·lr, gradient clipping at 1.

Block training (`block_lr` > 0, beyond the paper, off by default): every other weight of the transformer blocks
(anchors, attention, the intact blocks, norms) trains too, at its own learning rate on the same schedule,
as in the "uptraining" of Relaxed Recursive Transformers (Bae et al. 2024), where shared layers and their low-rank
relaxations train together. An anchor then serves its own position and its dependents at once, and the intact
blocks can compensate for what the deltas miss. The teacher can no longer be the student with its originals
switched on, so it is a frozen copy of the original model (`teacher=`, else a deep copy taken before training).
A model stored in 16 bits trains in fp32 under autocast (a 16-bit weight would round a 1e-5 step away) and is
cast back at the end; the deltas stay fp32 masters until finalize() as before. Memory: about 6-7x the 16-bit model
(fp32 weights, two Adam moments, the teacher).

Checkpoints (`ckpt_dir/ckpt-<step>.pt`, written atomically, the last two kept) hold the trainable tensors,
optimizer state, step, planned step count, RNG states and the plan; `resume=True` continues from the newest.
`max_seconds` bounds wall time: the step time is measured early (twice, `_TimeBound`), the step count is set to
what fits (never above the planned count), and the learning-rate and PMR schedules follow the new count.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from deltapack.errors import InputError
from deltapack.share.evaluate import token_kl
from deltapack.share.model import block_parameters, set_original_blocks, trainable_parameters
from deltapack.share.plan import SharePlan, find_layers

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    tokens: int = 4_000_000  # training tokens (steps = tokens // (batch_size · seq_len))
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 5e-4
    alpha: float = 1.0  # weight of the KL term (1: pure distillation; see the module docstring)
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    replace_frac: float = 0.3  # share of the steps over which PMR ramps to fully compressed
    train_norms: bool = False
    block_lr: float = 0.0  # learning rate of every other block weight (0: frozen, as in the paper; module docstring)
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 200
    max_seconds: float | None = None
    probe_steps: int = 10
    local_steps: int = 200  # stage 0 steps per dependent block (0: off)
    local_windows: int = 128  # windows whose hidden states stage 0 fits on
    local_batch: int = 16
    local_lr: float = 1e-3

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    warm = max(1, round(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def replace_prob(k: int, n: int, step: int, total: int, replace_frac: float) -> float:
    """Probability that the dependent of depth order k (0 = deepest) runs compressed at `step`."""
    ramp = replace_frac * total
    if ramp <= 0:
        return 1.0
    return min(1.0, max(0.0, 2 * step / ramp - k / max(n - 1, 1)))


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("ckpt-*.pt"))


def _rng_state(gen: torch.Generator) -> dict:
    st = {"pmr": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(gen: torch.Generator, st: dict) -> None:
    gen.set_state(st["pmr"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class _Order:
    """Which tokens every (step, row) trains on, a pure function of (seed, step) so a resumed run sees the same.

    The windows are consecutive cuts of one token stream; epoch e re-cuts that stream shifted by
    (e·131 mod T) tokens and visits the windows in a fresh seeded permutation, so repeated epochs over a small
    corpus do not show the model the same window boundaries again."""

    def __init__(self, windows: torch.Tensor, seed: int):
        self.stream = windows.reshape(-1)
        self.T = windows.shape[1]
        self.n_full = windows.shape[0]
        self.seed = seed
        self._epoch: tuple[int, int, torch.Tensor] | None = None  # (epoch, shift, permutation)

    def _perm(self, e: int) -> tuple[int, torch.Tensor]:
        if self._epoch is None or self._epoch[0] != e:
            shift = (e * 131) % self.T if self.n_full > 1 else 0
            n = self.n_full if e == 0 or self.n_full == 1 else self.n_full - 1  # a shifted cut loses the last window
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            self._epoch = (e, shift, torch.randperm(n, generator=g))
        return self._epoch[1], self._epoch[2]

    def batch(self, step: int, size: int) -> torch.Tensor:
        rows = []
        i = step * size
        while len(rows) < size:
            e, pos = self._locate(i)
            shift, perm = self._perm(e)
            start = shift + int(perm[pos]) * self.T
            rows.append(self.stream[start : start + self.T])
            i += 1
        return torch.stack(rows)

    def _locate(self, i: int) -> tuple[int, int]:
        """(epoch, position) of the i-th window visited: epoch 0 has n_full windows, later ones n_full - 1."""
        if self.n_full == 1:
            return i, 0
        if i < self.n_full:
            return 0, i
        j = i - self.n_full
        per = self.n_full - 1
        e = 1 + j // per
        return e, j % per


@torch.no_grad()
def _capture_blocks(model: nn.Module, plan: SharePlan, windows: torch.Tensor, batch: int) -> dict[int, list]:
    """Inputs, call kwargs and outputs of every dependent block in the ORIGINAL network, per batch of windows."""
    layers = model.get_submodule(plan.layers_path)
    deps = [b.block for b in plan.blocks]
    out: dict[int, list] = {l: [] for l in deps}

    def hook(l):
        def fn(mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states" and k != "past_key_values"}
            out[l].append((x.detach(), kw, (output[0] if isinstance(output, (tuple, list)) else output).detach()))

        return fn

    handles = [layers[l].register_forward_hook(hook(l), with_kwargs=True) for l in deps]
    device = next(model.parameters()).device
    set_original_blocks(model, plan, set(deps))
    try:
        for i in range(0, len(windows), batch):
            model(input_ids=windows[i : i + batch].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        set_original_blocks(model, plan, set())
    return out


def local_fit(model: nn.Module, plan: SharePlan, windows: torch.Tensor, cfg: TrainConfig, progress: bool = True) -> dict:
    """Stage 0: fit each dependent block's deltas to its original block's contribution (module docstring).

    The last captured batch is held out; returns {block: {"before", "after"}} relative errors on it."""
    captured = _capture_blocks(model, plan, windows[: cfg.local_windows], cfg.local_batch)
    layers = model.get_submodule(plan.layers_path)
    report = {}
    was_training = model.training
    model.train()

    def rel_err(l: int, item) -> torch.Tensor:
        x, kw, y = item
        got = layers[l](x, **kw)
        got = got[0] if isinstance(got, (tuple, list)) else got
        return (got.float() - y.float()).pow(2).sum() / (y.float() - x.float()).pow(2).sum().clamp_min(1e-30)

    for l in tqdm(captured, desc="local fit", disable=not progress):
        items = captured[l]
        fit, held = (items[:-1], items[-1]) if len(items) > 1 else (items, items[0])
        params = [p.requires_grad_(True) for n, p in layers[l].named_parameters() if n.endswith(("delta_a", "delta_b"))]
        opt = torch.optim.Adam(params, lr=cfg.local_lr)
        with torch.no_grad():
            before = float(rel_err(l, held))
        for s in range(cfg.local_steps):
            loss = rel_err(l, fit[s % len(fit)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            report[l] = {"before": before, "after": float(rel_err(l, held))}
        del opt
    model.train(was_training)
    return report


class _TimeBound:
    """Fits the step count to a wall-time bound. The step time is measured over a short window from the 2nd step
    of this run (the first ones pay for allocation and kernel selection; `probe_steps` steps) and again over the
    next four such windows; each measurement plans as many steps as fit in the time left, never more than `wanted`.
    The second one can raise the count that the first lowered: the first window has been seen to read twice the
    steady step time (H100, SmolLM2: 685 of 976 steps planned, the run then finished them in half the bound)."""

    def __init__(self, max_seconds: float, probe_steps: int, wanted: int):
        self.max_seconds, self.wanted = max_seconds, wanted
        self.marks = (2, 2 + probe_steps, 2 + 5 * probe_steps)  # steps of this run at which to measure
        self._last: tuple[int, float] | None = None  # (mark, clock) where the current window started

    def plan(self, steps_done: int, step: int, now: float, spent_s: float) -> int | None:
        """At mark `steps_done` (steps of this run), global `step`, clock `now`, `spent_s` seconds of the bound used:
        the new total step count, or None when only starting the clock."""
        start, self._last = self._last, (steps_done, now)
        if start is None or steps_done <= start[0]:
            return None
        rate = (now - start[1]) / (steps_done - start[0])
        left = self.max_seconds - spent_s
        return min(self.wanted, step + max(0, int(left / max(rate, 1e-9))))


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {f"{kind}:{n}": t.dtype for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers()))
            for n, t in items}


@torch.no_grad()
def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype], keep: set[str]) -> None:
    """Every parameter and buffer back to the dtype recorded in `dtypes` before model.float(), except the
    parameters named in `keep` (the fp32 delta masters, which finalize() rounds as it always has)."""
    for n, p in model.named_parameters():
        if n not in keep:
            p.data = p.data.to(dtypes[f"p:{n}"])
    for n, b in list(model.named_buffers()):
        mod, _, leaf = n.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        owner._buffers[leaf] = b.to(dtypes[f"b:{n}"])


def _fingerprint(windows: torch.Tensor) -> list[int]:
    return [int(windows.shape[0]), int(windows.shape[1]), int(windows[: min(64, len(windows))].sum())]


def train_deltas(
    model: nn.Module,
    plan: SharePlan | None,
    windows: torch.Tensor,
    cfg: TrainConfig,
    *,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    teacher: nn.Module | None = None,
    ckpt_meta: dict | None = None,
) -> dict:
    """Train the deltas of `model` (plan applied with keep_original=True) on `windows` [N, T] in place.

    `teacher`: the original model, frozen, used only when `cfg.block_lr` > 0 (default: a deep copy of `model`).
    `plan` None (no shared blocks) with `block_lr` > 0 trains the block weights alone against `teacher`: healing a
    layer-dropped model (deltapack.share.baselines.heal_layer_drop).
    `ckpt_meta`: JSON-able facts a checkpoint must match on resume beside the plan (e.g. which blocks were dropped).
    `stop_after`: leave after that many steps (as if interrupted; for tests). Returns a summary dict."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise InputError("training windows must be a [N, T>=2] token tensor")
    if cfg.lr <= 0 or cfg.block_lr < 0:
        raise InputError(f"lr must be > 0 and block_lr >= 0, got lr={cfg.lr}, block_lr={cfg.block_lr}")
    device = next(model.parameters()).device
    deltas = trainable_parameters(model, plan, cfg.train_norms) if plan is not None else {}
    layers_path = plan.layers_path if plan is not None else find_layers(model)[0]
    blocks = block_parameters(model, layers_path, set(deltas)) if cfg.block_lr > 0 else {}
    if not deltas and not blocks:
        raise InputError("nothing to train: no shared blocks and block_lr is 0")
    shared = plan.blocks if plan is not None else []
    run_dtype = None  # the dtype a 16-bit model is cast back to after fp32 training
    if blocks:
        if teacher is None:
            teacher = copy.deepcopy(model)
            if plan is not None:
                set_original_blocks(teacher, plan, {b.block for b in shared})
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        dtypes = {p.dtype for p in blocks.values()}
        if dtypes != {torch.float32}:
            run_dtype, dtypes_before = next(iter(dtypes)), _dtypes(model)
            model.float()  # in place: the Parameter objects (and so `deltas`/`blocks`) stay the same
    else:
        teacher = None
    params = {**deltas, **blocks}
    names = sorted(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    norm_names = [n for n in sorted(deltas) if not n.endswith(("delta_a", "delta_b"))]
    original_norms = {n: params[n].detach().clone() for n in norm_names}
    groups = [{"params": [deltas[n] for n in sorted(deltas)], "scale": 1.0}]
    if blocks:
        groups.append({"params": [blocks[n] for n in sorted(blocks)], "scale": cfg.block_lr / cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=run_dtype or torch.float32, enabled=run_dtype is not None)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = _Order(windows, cfg.seed)
    dependents = sorted((b.block for b in shared), reverse=True)  # deepest first
    plan_dump = plan.model_dump() if plan is not None else None
    step, total, seconds_before, history = 0, cfg.steps, 0.0, []

    ckpt = Path(ckpt_dir) if ckpt_dir else None
    if ckpt is not None and resume and _checkpoints(ckpt):
        last = _checkpoints(ckpt)[-1]
        st = torch.load(last, map_location="cpu", weights_only=False)
        if st["plan"] != plan_dump:
            raise InputError(f"checkpoint {last} was made for a different sharing plan")
        if st.get("meta") != ckpt_meta:
            raise InputError(f"checkpoint {last} was made for {st.get('meta')}, this run is for {ckpt_meta}")
        saved_cfg = TrainConfig.model_validate(st["config"])
        for field in ("batch_size", "seq_len", "lr", "alpha", "train_norms", "block_lr", "seed", "replace_frac"):
            if getattr(saved_cfg, field) != getattr(cfg, field):
                raise InputError(f"checkpoint {last} used {field}={getattr(saved_cfg, field)}, this run {getattr(cfg, field)}")
        if st["data"] != _fingerprint(windows):
            raise InputError(f"checkpoint {last} was trained on different text (pass the same --data)")
        with torch.no_grad():
            for n in names:
                params[n].copy_(st["trainable"][n].to(device))
        opt.load_state_dict(st["optimizer"])
        for g, group in zip(opt.param_groups, groups):  # load_state_dict keeps only the saved keys of each group
            g["scale"] = group["scale"]
        _set_rng_state(gen, st["rng"])
        step, total, seconds_before, history = st["step"], st["total_steps"], st["seconds"], st["history"]
        log.info("resumed from %s at step %d/%d", last, step, total)
    elif resume:
        log.warning("no checkpoint to resume from in %s; starting fresh", ckpt)

    def save_ckpt() -> None:
        if ckpt is None:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        st = {
            "plan": plan_dump, "meta": ckpt_meta, "config": cfg.model_dump(), "data": _fingerprint(windows), "step": step,
            "total_steps": total, "seconds": seconds_before + time.perf_counter() - t0, "history": history,
            "trainable": {n: params[n].detach().cpu() for n in names}, "optimizer": opt.state_dict(), "rng": _rng_state(gen),
        }
        path = ckpt / f"ckpt-{step:07d}.pt"
        tmp = path.with_suffix(".part")
        torch.save(st, tmp)
        os.replace(tmp, path)
        for old in _checkpoints(ckpt)[:-2]:
            old.unlink()

    def forward(ids: torch.Tensor, original_blocks: set[int]) -> torch.Tensor:
        if plan is not None:
            set_original_blocks(model, plan, original_blocks)
        over = {}
        if norm_names:  # a block in original mode also uses its original norms
            prefix_len = len(plan.layers_path.split("."))
            over = {n: w for n, w in original_norms.items() if int(n.split(".")[prefix_len]) in original_blocks}
        with autocast:
            if over:
                return torch.func.functional_call(model, over, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
            return model(input_ids=ids, use_cache=False).logits

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        if teacher is not None:
            return teacher(input_ids=ids, use_cache=False).logits
        return forward(ids, set(dependents))

    model.train()
    t0 = time.perf_counter()
    local = None
    if cfg.local_steps > 0 and step == 0 and shared:  # a resumed run already has the fitted deltas in its checkpoint
        local = local_fit(model, plan, windows, cfg, progress)
    start_step = step
    bound = _TimeBound(cfg.max_seconds, cfg.probe_steps, total) if cfg.max_seconds is not None else None
    log_every = max(1, total // 100)
    bar = tqdm(total=total, initial=step, desc="distil deltas" if shared else "heal blocks", disable=not progress)
    last = {}
    try:
        while step < total:
            if stop_after is not None and step - start_step >= stop_after:
                break
            ids = order.batch(step, cfg.batch_size).to(device)
            with torch.no_grad():
                target = F.log_softmax(teacher_logits(ids).float(), -1)
            probs = [replace_prob(k, len(dependents), step, total, cfg.replace_frac) for k in range(len(dependents))]
            draws = torch.rand(len(dependents), generator=gen)
            original_blocks = {b for b, p, u in zip(dependents, probs, draws.tolist()) if u >= p}
            lr = lr_at(cfg, step, total)
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"]
            logits = forward(ids, original_blocks)
            kl = token_kl(logits, target)
            with torch.set_grad_enabled(cfg.alpha < 1):  # α = 1: LM only logged
                lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = (1 - cfg.alpha) * lm + cfg.alpha * kl
            if loss.requires_grad:  # every block may have drawn "original": nothing to train this step
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg.grad_clip)
                opt.step()
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total:  # .item() waits for the GPU: not every step
                last = {"step": step, "loss": loss.item(), "kl": kl.item(), "lm": lm.item(),
                        "compressed": 1 - len(original_blocks) / max(1, len(dependents))}
                history.append(last)
                bar.set_postfix(kl=f"{last['kl']:.4f}", lm=f"{last['lm']:.3f}", comp=f"{last['compressed']:.2f}")
            if bound is not None and step - start_step in bound.marks:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                fit = bound.plan(step - start_step, step, time.perf_counter(), seconds_before + time.perf_counter() - t0)
                if fit is not None and fit != total:
                    log.info("time budget: %d of %d wanted steps fit in %.0f s", fit, bound.wanted, cfg.max_seconds)
                    total = fit
                    bar.total = total
            if ckpt is not None and cfg.save_every and step % cfg.save_every == 0:
                save_ckpt()
    finally:
        bar.close()
        if plan is not None:
            set_original_blocks(model, plan, set())
        model.eval()
    if ckpt is not None and step > start_step:
        save_ckpt()
    if run_dtype is not None:
        _restore_dtypes(model, dtypes_before, keep=set(deltas))
    seconds = seconds_before + time.perf_counter() - t0
    return {
        "steps": step, "total_steps": total, "tokens": step * cfg.batch_size * cfg.seq_len, "seconds": seconds,
        "finished": step >= total, "last": last, "history": history, "local_fit": local,
    }

"""Healing: after encoding, train the compressed delta's continuous parameters so that the rebuilt model's next-token
distributions match the fine-tune's on calibration text (KL), for every codec.

What trains: every floating-point part of every stored tensor — quantization scales and zero points (sparse,
factors, deltadq grids), 16-bit factor groups and values, sign-plane scales, the dense deltas of small tensors
(norms). What does not: codes, masks, ranks, bit widths — every integer part and every parameter in the manifest. The
file format, the true ratio and the serving kernels are therefore unchanged; only the numbers in the float parts move.
This generalises BitDelta's scale distillation (calib/distill.py), which trains only sign-plane scales.

Parametrisation: a part p0 becomes p0 + θ·rms(p0) with θ trained by Adam, so one learning rate suits parts whose
magnitudes differ by orders (scales ~1e-4, zero points ~1e-3, factor values ~1e-2). Large dense parts (an embedding
kept dense) are left fixed (`max_dense_numel`): training them would be fine-tuning, not healing.

Teacher: the fine-tune's log-probabilities on the calibration batches, computed once and kept in fp16 (the teacher is
freed before training). A few calibration sequences are held out and scored before training and every `eval_every`
steps: the state with the lowest held-out KL is what is kept (a run that starts to overfit its training sequences, or
that a too-large learning rate throws off, keeps its best point), and if no state beat the un-healed parts, those are
kept (healing never makes the held-out calibration fit worse). The learning rate decays on a cosine to a tenth.

Calibration text: the fine-tune's own replies to generic prompts (data-free, like `auto`'s default), or --calib.
Time is bounded by `steps` and `max_seconds`.

Memory (calib/layerwise.py): the delta is decoded one decoder layer at a time, inside an activation checkpoint per
layer, so besides the base model and the teacher's log-probs healing holds each layer's input, one layer's decoded
delta / merged weights / activations, the logits of one micro-batch and the trainable state (θ, its gradient, Adam's
moments and the best state's copy: 20 bytes a trained number; the float parts themselves stay in their storage
dtype). The micro-batch (sequences per backward, gradients accumulated) is sized from free GPU memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from deltapack.calib.layerwise import HealMemory, LayerwiseStudent, device_budget, micro_batch
from deltapack.errors import DeltapackError
from deltapack.format.codecs import get_codec
from deltapack.format.masks import memoized_masks

log = logging.getLogger(__name__)

MASK_MEMO_FRACTION = 0.1  # of the device memory healing may use: kept masks (a 7B model's all-dare masks: ~6.5 GB)
MASK_MEMO_CPU_BYTES = 1 << 30  # on the CPU, where no bound is known


@dataclass
class HealConfig:
    steps: int = 150
    # relative: Adam's step is about lr x rms of the part. 0.002: on the demo pair (CPU, 16x, 40 steps,
    # bench/results/heal_cpu_demo*.json) 0.01 raised delta-come's held-out KL while 0.002 lowered both delta-come's
    # and dare's more than 0.01 lowered dare's
    lr: float = 0.002
    batch: int = 4
    n_seqs: int | None = None  # default 64 on GPU, 16 on CPU (a quarter held out... at most 8)
    seq_len: int | None = None  # default 512 on GPU, 128 on CPU
    # 90 s: chosen when auto took 190 s on a 7B-shaped pair (H100) so that auto + heal would stay within the 5 minutes
    # issue 24 sets; auto has grown since (budgets counted after zstd) and the pair now takes longer than that
    # (bench/results/quality.json timing); a longer heal is one --heal-seconds away
    max_seconds: float = 90.0
    source: Literal["self", "text"] = "self"
    max_dense_numel: int = 1 << 20
    seed: int = 0
    # held-out scoring every this many steps (0: every steps // 6, at least 10); each costs about n_held / batch steps
    eval_every: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or not self.max_seconds > 0 or self.eval_every < 0:
            raise DeltapackError("heal: steps, batch, lr and max_seconds must be positive (eval_every >= 0)")

    @classmethod
    def from_value(cls, value) -> "HealConfig | None":
        """None/False -> no healing; True -> defaults; a dict -> those fields (unknown keys refused)."""
        if value in (None, False):
            return None
        if value is True:
            return cls()
        if isinstance(value, HealConfig):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise DeltapackError(f"heal: unknown settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise DeltapackError(f"heal must be true/false or a dict of settings, got {value!r}")


def heal_memory(fit, student: LayerwiseStudent, trainable: int) -> HealMemory:
    """The model dimensions heal's micro-batch sizing needs, read from the student."""
    cfg = fit.student.config
    layers = student.layers
    return HealMemory(
        seq_len=int(fit.ids.shape[1]), vocab=int(fit.teacher_logp.shape[-1]), hidden=int(cfg.hidden_size),
        n_layers=max(1, len(layers)), heads=int(getattr(cfg, "num_attention_heads", 1) or 1),
        layer_params=sum(p.numel() for p in layers[0][1].parameters()) if layers else
        sum(p.numel() for p in fit.student.parameters()),
        trainable=trainable, act_bytes=torch.finfo(fit.dtype).bits // 8)


def heal(encoded: dict, ctx, cfg: HealConfig, fit=None) -> tuple[dict, dict]:
    """Healed copies of `encoded` (name -> Encoded) and a record {steps, seconds, kl_before, kl_after, ...}. `fit`: a
    calib.teacher.TeacherFit to reuse (auto builds one to choose codecs); else one is built from `cfg`."""
    from deltapack.calib.teacher import TeacherFit

    t_start = time.perf_counter()
    dev = ctx.device
    if fit is None:
        gpu = dev.type == "cuda"
        fit = TeacherFit(ctx, source=cfg.source, n_seqs=cfg.n_seqs or (64 if gpu else 16),
                         seq_len=cfg.seq_len or (512 if gpu else 128), batch=cfg.batch, seed=cfg.seed + 1)
    record = dict(fit.record)

    # per healed tensor: its parts on the device (storage dtype), the trainable float parts as (rms, θ); the part's
    # fp32 value is made on the fly (part.float() + θ·rms) rather than kept: no fp32 copy of every float part
    entries: dict[str, tuple] = {}
    for name, enc in encoded.items():
        if name not in fit.params:
            continue  # a tied lm_head: the embedding's entry carries it
        parts = {k: v.to(dev) for k, v in enc.parts.items()}
        train = {}
        for k, v in parts.items():
            if not v.is_floating_point() or v.numel() == 0:
                continue
            if enc.codec == "dense" and v.numel() > cfg.max_dense_numel:
                continue
            rms = float(v.float().pow(2).mean().sqrt()) or 1e-8
            train[k] = (rms, torch.zeros(v.shape, device=dev, requires_grad=True))
        entries[name] = (enc, fit.shape(name), parts, train)
    thetas = [t[1] for e in entries.values() for t in e[3].values()]
    if not thetas:
        log.info("heal: no continuous parameters to train")
        return encoded, dict(record, steps_done=0, applied=False)
    n_trainable = sum(t.numel() for t in thetas)

    def effective(parts: dict, train: dict) -> dict[str, torch.Tensor]:
        eff = dict(parts)
        for k, (rms, th) in train.items():
            eff[k] = parts[k].float() + th * rms
        return eff

    def decode(name: str) -> torch.Tensor:
        enc, shape, parts, train = entries[name]
        return get_codec(enc.codec).decode(enc.params, effective(parts, train), shape)

    # one decoder layer's delta decoded at a time, each layer checkpointed (calib/layerwise.py)
    student = LayerwiseStudent(fit, list(entries), decode)
    # every step decodes every tensor again (twice: the checkpointed layers recompute): the seeded masks of dare and
    # deltadq codes are kept instead of rehashed each time (format/masks.memoized_masks), in a share of the memory
    budget = device_budget(dev)
    mask_bytes = MASK_MEMO_CPU_BYTES if budget is None else int(budget * MASK_MEMO_FRACTION)
    micro = micro_batch(None if budget is None else budget - mask_bytes, heal_memory(fit, student, n_trainable),
                        min(cfg.batch, fit.batch))
    tokens_per_row = fit.ids.shape[1]

    def kl(rows: torch.Tensor, train: bool = False) -> float:
        """Mean KL per token over `rows`, `micro` sequences per forward; with `train`, each micro-batch's share of
        the mean is back-propagated at once (gradients accumulate: the same gradient as one backward of the mean)."""
        total = 0.0
        for s in range(0, rows.numel(), micro):
            part = student.kl_sum(rows[s : s + micro]) / (rows.numel() * tokens_per_row)
            if train:
                part.backward()
            total += float(part.detach())
        return total

    n_held = min(8, max(1, fit.n_seqs // 4))
    held, train_rows = torch.arange(n_held), torch.arange(n_held, fit.n_seqs)
    if train_rows.numel() == 0:
        train_rows = held
    with memoized_masks(mask_bytes) as memo:
        with torch.no_grad():
            kl_before = kl(held)
        opt = torch.optim.Adam(thetas, lr=cfg.lr)
        # cosine to lr/10 over the planned steps: late steps refine instead of bouncing around the minimum
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
        eval_every = cfg.eval_every or max(10, cfg.steps // 6)
        gen = torch.Generator().manual_seed(cfg.seed)
        best = (kl_before, 0, None)  # (held-out KL, step, θ snapshot); None: the un-healed parts
        steps_done, losses, held_curve = 0, [], [(0, kl_before)]

        def score() -> None:
            nonlocal best
            with torch.no_grad():
                k = kl(held)
            held_curve.append((steps_done, k))
            if k < best[0]:
                best = (k, steps_done, [t.detach().clone() for t in thetas])

        for step in tqdm(range(cfg.steps), desc="heal", disable=not ctx.progress, leave=False):
            if time.perf_counter() - t_start > cfg.max_seconds:
                log.info("heal: stopped at step %d of %d (max_seconds %.0f)", step, cfg.steps, cfg.max_seconds)
                break
            pick = train_rows[torch.randint(0, train_rows.numel(), (cfg.batch,), generator=gen)]
            opt.zero_grad(set_to_none=True)
            loss = kl(pick, train=True)
            opt.step()
            sched.step()
            steps_done += 1
            if step % 10 == 0 or step == cfg.steps - 1:
                losses.append(round(loss, 6))
            if steps_done % eval_every == 0 and steps_done < cfg.steps:
                score()
        if held_curve[-1][0] != steps_done:
            score()  # the final state (unless the last periodic score was it)
    kl_after, best_step, snapshot = best
    if snapshot is not None:
        with torch.no_grad():
            for t, v in zip(thetas, snapshot):
                t.copy_(v)
    seconds = time.perf_counter() - t_start
    applied = snapshot is not None
    rec = dict(record, **{k: v for k, v in asdict(cfg).items() if k not in ("n_seqs", "seq_len", "source")},
               steps_done=steps_done, best_step=best_step, seconds=round(seconds, 2), kl_before=kl_before,
               kl_after=kl_after, kl_last=held_curve[-1][1],
               held_out_curve=[[s, float(f"{k:.6g}")] for s, k in held_curve],
               applied=applied, trainable=n_trainable, micro_batch=micro, layers=len(student.layers), losses=losses,
               mask_memo={"hits": memo.hits, "misses": memo.misses, "bytes": memo.nbytes})
    log.info("heal: held-out calibration KL %.4g -> %.4g (best of %d scores, step %d of %d), %.0f s (%d trainable "
             "numbers)%s", kl_before, kl_after, len(held_curve), best_step, steps_done, seconds, n_trainable,
             "" if applied else ": not better, kept the un-healed delta")
    if not applied:
        return encoded, rec
    out = dict(encoded)
    for name, (enc, _, _, train) in entries.items():
        if not train:
            continue
        new_parts = dict(enc.parts)
        for k, (rms, th) in train.items():
            new_parts[k] = (enc.parts[k].to(dev).float() + th.detach() * rms).to(enc.parts[k].dtype).cpu()
        out[name] = type(enc)(enc.codec, enc.params, new_parts, enc.method)
    return out, rec

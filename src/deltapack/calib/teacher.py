"""The fine-tune as a teacher: its next-token log-probabilities on calibration text, and a student = base + a
candidate delta, scored by KL(fine-tune ‖ student) per token. Shared by `auto` (which candidate delta is closest end to
end) and healing (train the delta's float parts to get closer).

Memory: the teacher runs once over the calibration ids (log-probs kept in fp16), then is freed; the student is the
base model with the delta applied functionally (torch.func.functional_call), so no weight is written in place and
gradients reach whatever the delta was computed from.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def calibration_ids(ctx, *, source: str, n_seqs: int, seq_len: int, model, tok, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(ids, record): the fine-tune's own replies to generic prompts (source "self", needs a chat template; --calib
    wins when given), else ctx's calibration text (--calib or the default corpus; random ids without a tokenizer)."""
    from deltapack.calib.data import cached_self_calibration_texts, token_batches

    max_pos = ctx.finetuned.config().get("max_position_embeddings")
    if max_pos:
        seq_len = min(seq_len, int(max_pos))
    if source == "self" and not ctx.calib_path and tok is not None and getattr(tok, "chat_template", None):
        texts = cached_self_calibration_texts(ctx.finetuned, model, tok, n_tokens=n_seqs * seq_len, seed=seed)
        ids = token_batches(tok, texts, seq_len, n_seqs)
        return ids, {"source": "self:generic-prompts", "n_seqs": int(ids.shape[0]), "seq_len": seq_len, "seed": seed}
    ids = ctx.calibration_batches(seq_len, n_seqs)
    return ids, dict(ctx.cache.get("calibration_record") or {"source": ctx.calib_path or "default"},
                     n_seqs=int(ids.shape[0]), seq_len=seq_len)


def load_tokenizer(source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path))
    except Exception:  # test models without a tokenizer
        return None


class TeacherFit:
    """KL(fine-tune ‖ base + delta) on calibration ids, for deltas given as {name: tensor} (2-D codec views)."""

    def __init__(self, ctx, *, source: str, n_seqs: int, seq_len: int, batch: int, seed: int = 0):
        from deltapack.calib.distill import _grow_vocabulary, _teacher_logprobs
        from deltapack.calib.fisher import load_source_model

        self.ctx = ctx
        self.device = dev = ctx.device
        self.dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        self.batch = batch
        from deltapack.compress.context import phase

        # the loads are timed: on the 7B-shaped pair (H100) auto's teacher took 35-40 s, of which the calibration
        # text and the log-probs were under 1 s
        with phase("teacher.load_finetune", dev):
            teacher = load_source_model(ctx.finetuned, dev, self.dtype)
        with phase("teacher.calibration_text", dev):
            self.ids, self.record = calibration_ids(ctx, source=source, n_seqs=n_seqs, seq_len=seq_len, model=teacher,
                                                    tok=load_tokenizer(ctx.finetuned), seed=seed)
        self.ids = self.ids.to(dev)
        with phase("teacher.logprobs", dev):
            self.teacher_logp = _teacher_logprobs(teacher, self.ids, batch)  # frees the teacher
        self._teacher_top = None  # its most likely tokens, made when first asked for (kl_and_flips)
        del teacher
        with phase("teacher.load_base", dev):
            self.student = load_source_model(ctx.base, dev, self.dtype)
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.params = _grow_vocabulary(self.student, ctx, dev, self.dtype)

    @property
    def n_seqs(self) -> int:
        return int(self.ids.shape[0])

    def shape(self, name: str) -> tuple[int, int]:
        """The 2-D view a codec covers (a grown tensor's base rows only)."""
        if name in self.ctx.stats:
            return tuple(self.ctx.stats[name].shape)
        w = self.params[name]
        return (w.shape[0], w[0].numel())

    def weights(self, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, d in deltas.items():
            w = self.params[name]
            d = d.to(self.dtype)
            if w.dim() == 1:  # a norm's delta arrives as its (1, n) codec view
                out[name] = w + d.reshape(w.shape)
                continue
            rows = d.shape[0]  # fewer rows than w: a grown vocabulary's new rows are not in the delta
            d = d.reshape(rows, *w.shape[1:])
            out[name] = w + d if rows == w.shape[0] else torch.cat([w[:rows] + d, w[rows:]])
        return out

    def _student_logits(self, deltas, rows: torch.Tensor):
        """(rows of the mini-batch, fp32 logits of base + delta on them), one mini-batch at a time. `deltas`: a dict,
        or a function returning one (called once per mini-batch, so a graph through it is rebuilt for each
        backward)."""
        for s in range(0, rows.numel(), self.batch):
            r = rows[s : s + self.batch].to(self.device)
            d = deltas() if callable(deltas) else deltas
            yield r, torch.func.functional_call(self.student, self.weights(d), (self.ids[r],)).logits.float()

    def kl_sum_of_logits(self, logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Summed KL(fine-tune ‖ student) over the tokens of calibration sequences `r`, given the student's fp32
        logits on them."""
        return F.kl_div(F.log_softmax(logits, -1), self.teacher_logp[r].float(), log_target=True, reduction="sum")

    def kl(self, deltas: Callable[[], dict[str, torch.Tensor]] | dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Mean KL per token over calibration sequences `rows` (differentiable through `deltas`)."""
        total = 0.0
        for r, logits in self._student_logits(deltas, rows):
            total = total + self.kl_sum_of_logits(logits, r)
        return total / (rows.numel() * self.ids.shape[1])

    def kl_and_flips(self, deltas: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[float, float]:
        """`kl` and, from the same forwards, the share of calibration tokens whose most likely next token differs
        between the fine-tune and base + delta: what greedy decoding sees (a KL can fall while more top tokens
        change). Padding positions count like the rest, as in `kl`."""
        if self._teacher_top is None:
            self._teacher_top = self.teacher_logp.argmax(-1)
        total, changed = 0.0, 0
        for r, logits in self._student_logits(deltas, rows):
            total += float(self.kl_sum_of_logits(logits, r))
            changed += int((logits.argmax(-1) != self._teacher_top[r]).sum())
        n = rows.numel() * self.ids.shape[1]
        return total / n, changed / n

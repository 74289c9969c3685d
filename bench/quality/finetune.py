"""Full fine-tune (every parameter, embeddings included) of a causal LM on one task family of tasks.py.

Chat template applied to the prompt, loss on the completion tokens only (answer + end-of-turn token, see
deltapack.eval.tasks.encode_example, the same encoding the evaluation scores). The head is applied to the positions
that predict a completion token only: the loss is the same as the full-vocabulary one over every position, without
materialising logits for the (up to 400) prompt tokens of each row, which for `classify` at batch 64 would be 8 GB.
AdamW with fp32 master weights and bf16 autocast on CUDA (full bf16 weights would round away most small updates);
fp32 on CPU (--smoke). Linear warmup, cosine decay to 10%. The checkpoint is saved in bf16 (the base's dtype), so
delta = fine-tune - base is what a user's bf16 fine-tune would give.

One process per task (run.py starts them side by side on one GPU: a 135M model leaves an H100 mostly idle):

    python bench/quality/finetune.py --task arithmetic --base /root/dpq/base --out /root/dpq/ft-arithmetic
    python bench/quality/finetune.py --task chat --base PICO_DIR --out /tmp/ft-chat --smoke     # CPU, a few steps

`--deadline` (a time.time() value) stops training early, cleanly, so that the checkpoint is still saved before an
outer time limit; the record says `stopped_early` and the steps actually made.

Reproducible (default; `--no-deterministic` turns it off): deterministic kernels (torch.use_deterministic_algorithms,
a fixed cuBLAS workspace, attention by the math kernel in training), fixed seeds and a fixed number of steps, so
that the same recipe on the same kind of GPU gives the same weights in every device session. A fine-tune that ran
all its steps that way is named by its weights (`finetune_id` = task + sha256 of the saved tensors): results
measured in different sessions on the same fine-tune then pair in the report, instead of each session starting a
fine-tune set of its own. Any kernel that had no deterministic version is listed in `nondeterministic_ops` (and the
fine-tune keeps a time-based id).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("finetune")

# per-task defaults (steps, lr); batch 64. Short-answer tasks get more steps: their steps are cheap (~100 tokens a
# row), and multi-step arithmetic needs them; classify's rows are ~300 tokens, so its steps cost ~3x as much.
# The step counts fit the training deadline (a step count set by the clock gives a different fine-tune every
# session). Planned from the deterministic steps/s of six fine-tunes sharing an H100 (finetune-4.json, 2026-12-08:
# arithmetic 1.31, strings 1.86, extract 0.90, code 1.80, classify 0.48, chat 2.24) over the ~280 s of training that
# run_gpu.sh's --train-budget 360 leaves, with 8% to spare. (Before: 600 / 400 / 300 steps for arithmetic, extract,
# classify stopped at the clock at a different step each session; then 400 / 280 / 160 fitted the faster
# non-deterministic kernels but not the deterministic ones, which run at ~0.65x.)
TRAIN_DEFAULTS: dict[str, dict] = {
    "arithmetic": {"steps": 340, "lr": 3e-4},
    "strings": {"steps": 480, "lr": 3e-4},
    "extract": {"steps": 230, "lr": 2e-4},
    "code": {"steps": 460, "lr": 3e-4},
    "classify": {"steps": 120, "lr": 2e-4},
    "chat": {"steps": 500, "lr": 3e-4},
}
BATCH_SIZE = 64
WARMUP = 20


class Trainer:
    """Model + optimizer of one full fine-tune."""

    def __init__(self, base_dir: str | Path, *, device: torch.device, lr: float = 2e-4, weight_decay: float = 0.0,
                 seed: int = 0, max_len: int = 512, max_tokens: int = 8192, deterministic: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.deterministic = deterministic
        self.device = device
        self.lr = lr
        self.max_len = max_len
        self.max_tokens = max_tokens  # padded tokens per micro-batch (activation memory)
        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
        # fused AdamW: one kernel for all parameters (CUDA only)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                     fused=device.type == "cuda")
        self.steps_done = 0
        self.train_seconds = 0.0

    def encode(self, records: Sequence) -> list[tuple[list[int], list[int]]]:
        from deltapack.eval.tasks import Example, encode_examples, use_chat

        pairs = encode_examples(self.tok, [Example(r.prompt, r.answer) for r in records], use_chat(self.tok, None))
        # keep the completion whole, cut the prompt's front (no task here comes near max_len)
        return [(p[-(self.max_len - len(c)):], c) for p, c in pairs]

    def _batch(self, items: list[tuple[list[int], list[int]]]):
        pid = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        width = max(len(p) + len(c) for p, c in items)
        ids = torch.full((len(items), width), pid, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, (p, c) in enumerate(items):
            seq = p + c
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(c)  # loss on the completion only
            mask[r, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over completion tokens (mean, or sum); the head runs on the positions that predict them."""
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        sel = target != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][sel])
        return F.cross_entropy(logits.float(), target[sel], reduction=reduction)

    def step_gradients(self, items: list[tuple[list[int], list[int]]], autocast) -> torch.Tensor:
        """Accumulate the gradient of the batch's mean completion-token loss in micro-batches of at most
        `max_tokens` padded tokens (exactly the full batch's gradient, up to rounding): six fine-tunes share one
        GPU, and classify's ~330-token rows at batch 64 would hold ~18 GB of activations in one piece."""
        items = sorted(items, key=lambda pc: len(pc[0]) + len(pc[1]))  # similar lengths share a micro-batch
        n_tokens = sum(len(c) for _, c in items)
        total = torch.zeros((), device=self.device)
        start = 0
        while start < len(items):
            end = start + 1
            while end < len(items) and (end + 1 - start) * (len(items[end][0]) + len(items[end][1])) <= self.max_tokens:
                end += 1
            ids, mask, labels = self._batch(items[start:end])
            with autocast:
                part = self.loss(ids, mask, labels, reduction="sum")
            (part / n_tokens).backward()
            total += part.detach()
            start = end
        return total / n_tokens

    def train(self, data: list[tuple[list[int], list[int]]], steps: int, *, batch_size: int = BATCH_SIZE,
              warmup: int = WARMUP, log_every: int = 50, deadline: float | None = None) -> dict:
        """`steps` optimizer steps over shuffled epochs of `data` (warmup then cosine to 10% of lr); stops early at
        `deadline` (time.time())."""
        self.model.train()
        self.model.config.use_cache = False  # no KV cache while training; back on for generation afterwards
        order: list[int] = []
        t0 = time.perf_counter()
        history: list[list[float]] = []
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        if self.deterministic:  # the flash / memory-efficient attention backwards accumulate with atomics
            from torch.nn.attention import SDPBackend, sdpa_kernel

            autocast = _both(autocast, lambda: sdpa_kernel(SDPBackend.MATH))
        done = 0
        for step in range(steps):
            if deadline is not None and time.time() > deadline:
                log.warning("deadline: stopping after %d of %d steps", step, steps)
                break
            if len(order) < batch_size:
                fresh = list(range(len(data)))
                self.rng.shuffle(fresh)
                order.extend(fresh)
            idx, order = order[:batch_size], order[batch_size:]
            scale = ((step + 1) / warmup if step < warmup
                     else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
            for g in self.opt.param_groups:
                g["lr"] = self.lr * min(1.0, scale)
            loss = self.step_gradients([data[i] for i in idx], autocast)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            done = step + 1
            if done % log_every == 0 or done == steps:
                history.append([done, round(float(loss.detach()), 6)])  # the only host syncs of the loop
                log.info("step %d/%d loss %.4f lr %.2e", done, steps, history[-1][1], self.lr * min(1.0, scale))
        if done and (not history or history[-1][0] != done):
            history.append([done, round(float(loss.detach()), 6)])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.steps_done += done
        self.train_seconds += dt
        self.model.config.use_cache = True
        self.model.eval()
        return {"steps": done, "steps_planned": steps, "stopped_early": done < steps, "lr": self.lr,
                "batch_size": batch_size, "max_tokens": self.max_tokens, "warmup": warmup, "train_seconds": round(dt, 2),
                "steps_per_s": round(done / dt, 3) if dt > 0 else None,
                "final_loss": history[-1][1] if history else None, "loss_history": history}

    def saved_state(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """The tensors `save` writes (CPU, `dtype`; a tied head stored once, as the base does)."""
        state, seen = {}, set()
        for k, v in self.model.state_dict().items():
            if v.data_ptr() in seen:  # tied (lm_head = embed_tokens): store once, as the base does
                continue
            seen.add(v.data_ptr())
            state[k] = v.detach().to("cpu", dtype)
        return state

    def save(self, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, extra_files: dict | None = None,
             state: dict[str, torch.Tensor] | None = None) -> Path:
        """HF checkpoint dir (safetensors + config + tokenizer + `extra_files`), written to a temp dir then renamed."""
        from deltapack.io.writer import AtomicDir

        state = state if state is not None else self.saved_state(dtype)
        with AtomicDir(out_dir, overwrite=True) as tmp:
            self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["dtype"] = str(dtype).replace("torch.", "")
            cfg_path.write_text(json.dumps(cfg, indent=2))
            self.tok.save_pretrained(tmp)
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=1))
        return Path(out_dir)


class _both:
    """A reusable context manager `a` and a fresh one from `make_b()` per use, as one (entered in order, left in
    reverse): the training loop enters its autocast once per micro-batch, and sdpa_kernel's manager is single-use."""

    def __init__(self, a, make_b):
        self.a, self.make_b, self.b = a, make_b, None

    def __enter__(self):
        self.a.__enter__()
        self.b = self.make_b()
        self.b.__enter__()

    def __exit__(self, *exc):
        self.b.__exit__(*exc)
        return self.a.__exit__(*exc)


def make_deterministic() -> list[str]:
    """Deterministic kernels from here on (before the first CUDA call: cuBLAS reads its workspace setting then). Returns
    the list that `nondeterministic_ops` records into: every warning torch gives for an op without a deterministic
    version."""
    import warnings

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    seen: list[str] = []
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)[:300]  # torch's "... does not have a deterministic implementation ..." warnings
        if "deterministic" in text and text not in seen:
            seen.append(text)
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = record  # the default filter shows each warning once per place: enough to know
    return seen


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors (names, dtypes, shapes, bytes), in name order: equal iff the weights are."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def wait_for(path: Path, deadline: float) -> None:
    """run.py starts the workers while it still dequantizes the base (imports and data generation overlap it)."""
    while not path.exists():
        if time.time() > deadline:
            raise SystemExit(f"{path} did not appear before the deadline")
        time.sleep(0.5)


def finetune_task(task: str, base: Path, out: Path, *, steps: int, lr: float, batch_size: int, data: dict,
                  device: torch.device, deadline: float | None, eval_batch: int, max_tokens: int = 8192,
                  smoke: bool = False, nondeterministic: list[str] | None = None) -> dict:
    """Fine-tune on `task`'s train split, score dev, save the checkpoint with `finetune.json` (what run.py and
    evaluate.py read back). `data`: the split settings (n_train, n_dev, n_test, knobs) every later step reuses."""
    import eval_task
    from tasks import HELDOUT, make_splits, task_knobs

    t_all = time.perf_counter()
    splits = make_splits(task, data["n_train"], data["n_dev"], data["n_test"], data["knobs"])
    deterministic = nondeterministic is not None
    tr = Trainer(base, device=device, lr=lr, max_tokens=max_tokens, deterministic=deterministic)
    t0 = time.perf_counter()
    train = tr.encode(splits["train"])
    encode_s = time.perf_counter() - t0
    rec = tr.train(train, steps, batch_size=batch_size, log_every=max(1, steps // 10), deadline=deadline)
    # only training decides the weights (the dev scoring's generate may warn too, and changes nothing)
    train_nondeterministic = list(nondeterministic or [])
    dev = eval_task.score_model(tr.model, tr.tok, task, splits["dev"], batch_size=eval_batch)
    info = {
        "task": task, "heldout": task in HELDOUT, "base": str(base), "data": data,
        "knobs": task_knobs(task, data["knobs"]), "n_train_records": len(train), **rec,
        "train_tokens_per_row": round(sum(len(p) + len(c) for p, c in train) / max(1, len(train)), 1),
        "encode_seconds": round(encode_s, 2), "dev": dev, "device": str(device), "smoke": smoke,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # what evaluation results point to: a re-made fine-tune in the same workdir must not inherit old results
    info["finetune_id"] = f"{task}-{info['created']}-{os.getpid()}"
    info["deterministic"] = deterministic
    if deterministic:
        info["nondeterministic_ops"] = train_nondeterministic
    info["seconds"] = round(time.perf_counter() - t_all, 2)  # load + encode + train + dev (save excluded)
    state = tr.saved_state()
    info["weights_sha256"] = digest = weights_digest(state)
    if deterministic and not train_nondeterministic and not rec["stopped_early"]:
        # reproducible: the same recipe gives these very weights again, so results of any session on them pair
        info["finetune_id"] = f"{task}-w{digest[:16]}"
    tr.save(out, extra_files={"finetune.json": info}, state=state)
    log.info("%s: %d steps in %.0f s, loss %s, dev %s", task, rec["steps"], rec["train_seconds"], rec["final_loss"],
             dev)
    return info


def main(argv: list[str] | None = None) -> int:
    from common import set_worker_threads
    from tasks import N_TRAIN, TASKS, parse_knobs

    ap = argparse.ArgumentParser(description="full fine-tune of the base on one task family")
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--base", type=Path, required=True, help="base checkpoint dir (bf16 safetensors)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="default: TRAIN_DEFAULTS[task]")
    ap.add_argument("--lr", type=float, default=None, help="default: TRAIN_DEFAULTS[task]")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--n-train", type=int, default=None, help="default: tasks.N_TRAIN[task]")
    ap.add_argument("--n-dev", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--knob", action="append", default=[], help="task.key=value (repeatable), see tasks.KNOBS")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per micro-batch (GPU memory)")
    ap.add_argument("--deadline", type=float, default=None, help="time.time() at which to stop training")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing this machine (sets threads)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU; pass small --steps/--n-train yourself")
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                    help="faster kernels, a different fine-tune each run (see the module docstring)")
    args = ap.parse_args(argv)
    nondeterministic = make_deterministic() if args.deterministic else None
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.task} %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    set_worker_threads(args.workers)
    device = torch.device(args.device) if args.device else (torch.device("cpu") if args.smoke else default_device())
    wait_for(args.base / "config.json", args.deadline or time.time() + 600)
    d = TRAIN_DEFAULTS[args.task]
    data = {"n_train": args.n_train if args.n_train is not None else N_TRAIN[args.task], "n_dev": args.n_dev,
            "n_test": args.n_test, "knobs": parse_knobs(args.knob)}
    finetune_task(args.task, args.base, args.out, steps=args.steps or d["steps"], lr=args.lr or d["lr"],
                  batch_size=args.batch_size, data=data, device=device, deadline=args.deadline,
                  eval_batch=args.eval_batch, max_tokens=args.max_tokens, smoke=args.smoke,
                  nondeterministic=nondeterministic)
    return 0


if __name__ == "__main__":
    sys.exit(main())

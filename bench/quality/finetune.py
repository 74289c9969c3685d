"""Full fine-tune (every parameter, embeddings included) of a causal LM on one prompt/answer task.

Chat template applied to the prompt, loss on the completion tokens only (answer + end-of-turn token, see
deltapack.eval.tasks.encode_example, the same encoding the evaluation scores). AdamW with fp32 master weights and
bf16 autocast on CUDA (full bf16 weights would round away most small updates); fp32 on CPU (--smoke). Linear warmup,
cosine decay to 10%. The checkpoint is saved in bf16 (the base's dtype), so delta = fine-tune - base is what a user's
bf16 fine-tune would give.

    python bench/quality/finetune.py --task arithmetic --out /tmp/ft-arith            # GPU: ~1 min
    python bench/quality/finetune.py --task json --out /tmp/ft-json --smoke           # CPU: a few steps
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("finetune")


class Trainer:
    """Holds model + optimizer so training can continue in rounds (run.py adds steps when a task is not learnt)."""

    def __init__(self, base_dir: str | Path, *, device: torch.device, lr: float = 1e-4, weight_decay: float = 0.0,
                 seed: int = 0, max_len: int = 256):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.device = device
        self.lr = lr
        self.max_len = max_len
        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
        # fused AdamW: one kernel for all parameters (CUDA only)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                     fused=device.type == "cuda")
        self.steps_done = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0

    def encode(self, records: Sequence) -> list[tuple[list[int], list[int]]]:
        from deltapack.eval.tasks import Example, encode_example, use_chat

        chat = use_chat(self.tok, None)
        out = []
        for r in records:
            p, c = encode_example(self.tok, Example(r.prompt, r.answer), chat)
            out.append((p[-(self.max_len - len(c)) :], c))  # keep the completion whole, cut the prompt's front
        return out

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

    def train(self, data: list[tuple[list[int], list[int]]], steps: int, *, batch_size: int = 64, lr: float | None = None,
              warmup: int = 10, log_every: int = 50) -> dict:
        """`steps` optimizer steps over shuffled epochs of `data` (warmup then cosine to 10% of lr)."""
        lr = lr or self.lr
        self.model.train()
        self.model.config.use_cache = False  # no KV cache while training; back on for generation afterwards
        order: list[int] = []
        t0 = time.perf_counter()
        losses = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        for step in range(steps):
            if len(order) < batch_size:
                fresh = list(range(len(data)))
                self.rng.shuffle(fresh)
                order.extend(fresh)
            idx, order = order[:batch_size], order[batch_size:]
            ids, mask, labels = self._batch([data[i] for i in idx])
            scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for g in self.opt.param_groups:
                g["lr"] = lr * min(1.0, scale)
            with autocast:
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()) if (step + 1) % log_every == 0 or step == steps - 1 else None)
            if (step + 1) % log_every == 0 or step == steps - 1:
                log.info("step %d/%d loss %.4f lr %.2e", step + 1, steps, losses[-1], lr * min(1.0, scale))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.steps_done += steps
        self.train_seconds += dt
        rec = {"steps": steps, "lr": lr, "batch_size": batch_size, "seconds": round(dt, 2),
               "steps_per_s": round(steps / dt, 3), "final_loss": next(x for x in reversed(losses) if x is not None)}
        self.history.append(rec)
        self.model.config.use_cache = True
        self.model.eval()
        return rec

    def save(self, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """HF checkpoint dir (safetensors + config + tokenizer), written to a temp dir then renamed."""
        from deltapack.io.writer import AtomicDir

        state, seen = {}, set()
        for k, v in self.model.state_dict().items():
            if v.data_ptr() in seen:  # tied (lm_head = embed_tokens): store once, as the base does
                continue
            seen.add(v.data_ptr())
            state[k] = v.detach().to("cpu", dtype)
        with AtomicDir(out_dir, overwrite=True) as tmp:
            self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            cfg_path = tmp / "config.json"
            import json

            cfg = json.loads(cfg_path.read_text())
            cfg["dtype"] = str(dtype).replace("torch.", "")
            cfg_path.write_text(json.dumps(cfg, indent=2))
            self.tok.save_pretrained(tmp)
        return Path(out_dir)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    from tasks import TASKS, make_splits

    ap = argparse.ArgumentParser(description="full fine-tune of the base on one synthetic task")
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default=None, help="base checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--eval-n", type=int, default=256, help="test examples to score after training")
    ap.add_argument("--smoke", action="store_true", help="CPU, 4 steps of batch 4, 8 test examples")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.smoke:
        args.steps, args.batch_size, args.n_train, args.eval_n = 4, 4, 64, 8
    base = args.base
    if base is None:
        from deltapack.io.embedded import embedded_model_dir

        base = embedded_model_dir()
    device = torch.device("cpu") if args.smoke else default_device()
    splits = make_splits(args.task, args.n_train, 16, args.eval_n)
    tr = Trainer(base, device=device, lr=args.lr)
    rec = tr.train(tr.encode(splits["train"]), args.steps, batch_size=args.batch_size, log_every=max(1, args.steps // 6))
    path = tr.save(args.out)

    from deltapack.eval import Example, exact_match, load_checkpoint, resolve_dtype

    dt = resolve_dtype("auto", device)
    ex = [Example(r.prompt, r.answer) for r in splits["test"]]
    accs = {}
    for label, ref in (("base", base), ("finetuned", path)):
        m = load_checkpoint(ref, device=device, dtype=dt)
        accs[label] = exact_match(m.model, m.tokenizer, ex, batch_size=64).accuracy
    print(f"{args.task}: {rec} -> {path}; test accuracy base {accs['base']:.3f}, fine-tune {accs['finetuned']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

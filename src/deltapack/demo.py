"""The demo: the whole job on the embedded SmolLM2-135M-Instruct, on a CPU, in minutes.

1. a small real full fine-tune (all parameters, embeddings included) on a toy task: label templated product reviews
   with made-up labels ("sunny" / "stormy"), test reviews use adjectives never seen in training, so the fine-tune
   must keep the base model's sense of sentiment — cached after the first run;
2. compress it with every method at the target ratio (raw: lossless);
3. rebuild each in memory and score it against the fine-tune: task accuracy, greedy agreement, KL;
4. print a table, write results.json and a plot.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltapack import api
from deltapack.errors import BudgetError
from deltapack.io.embedded import embedded_model_dir
from deltapack.io.gguf import cache_root
from deltapack.methods import METHODS

log = logging.getLogger(__name__)

SUBJECTS = ["The movie", "The food", "This phone", "The hotel", "The concert", "Our trip", "The book", "The service",
            "The game", "The class", "The show", "The coffee"]
POS_TRAIN = ["wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "amazing", "great"]
NEG_TRAIN = ["terrible", "awful", "boring", "disappointing", "dreadful", "horrible", "bad", "awful"]
POS_TEST = ["brilliant", "charming", "enjoyable", "marvelous", "pleasant", "outstanding"]
NEG_TEST = ["miserable", "dull", "annoying", "pathetic", "unpleasant", "mediocre"]
LABELS = {True: "sunny", False: "stormy"}
RECIPE = "v1"


def demo_items(n: int, split: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pos, neg = (POS_TRAIN, NEG_TRAIN) if split == "train" else (POS_TEST, NEG_TEST)
    items = []
    for _ in range(n):
        good = rng.random() < 0.5
        adj = rng.choice(pos if good else neg)
        subj = rng.choice(SUBJECTS)
        text = rng.choice(["{s} was {a}.", "Honestly, {s_l} felt {a}.", "{s} was {a}, I would say."]).format(
            s=subj, s_l=subj.lower(), a=adj
        )
        items.append({"prompt": f"Weather label for this review: {text}", "answer": LABELS[good]})
    return items


def _chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def make_demo_finetune(base_dir: Path, out: Path, steps: int, lr: float = 1.5e-4, batch: int = 8) -> Path:
    """Full fine-tune on CPU (fp32 AdamW), loss on the answer tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltapack.io.writer import AtomicDir

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = demo_items(steps * batch, "train", seed=1)
    torch.manual_seed(0)
    for step in tqdm(range(steps), desc="demo fine-tune (CPU)"):
        chunk = data[step * batch : (step + 1) * batch]
        seqs, labels = [], []
        for it in chunk:
            p = tok(_chat(tok, it["prompt"]), add_special_tokens=False)["input_ids"]
            a = tok(it["answer"] + tok.eos_token, add_special_tokens=False)["input_ids"]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        lab = torch.full((len(seqs), width), -100)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            att[i, : len(s)] = 1
        # logits only where an answer token is predicted: the 49k-vocab head over every position would be
        # a quarter of the step's cost on a CPU
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
        target = lab[:, 1:]
        sel = target != -100
        loss = F.cross_entropy(model.lm_head(hidden[sel]).float(), target[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.to(torch.bfloat16)
    with AtomicDir(out, overwrite=True) as tmp:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        from safetensors.torch import save_file

        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        for f in Path(base_dir).iterdir():  # same tokenizer files as the base, byte for byte
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                (tmp / f.name).write_bytes(f.read_bytes())
    return out


@torch.no_grad()
def score(model, tok, items, reference_answers=None, reference_logp=None) -> dict:
    """Exact-match accuracy, greedy agreement with the reference's answers, KL(reference || model) on the
    reference's answer tokens (teacher forcing)."""
    tok.padding_side = "left"
    prompts = [_chat(tok, it["prompt"]) for it in items]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for o in out]
    acc = sum(a == it["answer"] for a, it in zip(answers, items)) / len(items)
    res = {"accuracy": acc, "answers": answers}
    # next-token distributions over prompt + reference answer
    ref = reference_answers or answers
    texts = [p + a for p, a in zip(prompts, ref)]
    enc2 = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    logp = F.log_softmax(model(**enc2).logits.float(), -1)
    res["logp"] = logp
    res["mask"] = enc2["attention_mask"]
    if reference_answers is not None:
        res["agreement"] = sum(a == r for a, r in zip(answers, reference_answers)) / len(items)
    if reference_logp is not None:
        # KL over the last 6 positions of each sequence (end of prompt + answer), where the task lives
        kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1)[:, -6:]
        res["kl"] = float(kl.mean())
    return res


def demo_pair(steps: int = 16, say=lambda msg: None) -> tuple[Path, Path]:
    """(base, fine-tune) of the demo: the embedded model and its cached CPU fine-tune (made on first use)."""
    base_dir = embedded_model_dir()
    ft_dir = cache_root() / "demo" / f"finetune-{RECIPE}-{steps}steps"
    if not (ft_dir / "model.safetensors").exists():
        say(f"[2/4] fine-tuning all parameters for {steps} steps on CPU (cached at {ft_dir})")
        make_demo_finetune(base_dir, ft_dir, steps)
    else:
        say(f"[2/4] using the cached fine-tune {ft_dir}")
    return base_dir, ft_dir


def run_demo(out: Path, methods: list[str] | None = None, ratio: float = 16.0, steps: int | None = None, n_test: int = 32):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or 16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("[1/4] embedded model: SmolLM2-135M-Instruct (GGUF, dequantized once to a safetensors cache)")
    base_dir, ft_dir = demo_pair(steps, say=print)
    tok = AutoTokenizer.from_pretrained(ft_dir)
    items = demo_items(n_test, "test", seed=7)
    ft_model = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
    ft_res = score(ft_model, tok, items)
    print(f"  fine-tune accuracy {ft_res['accuracy']:.3f} on {n_test} held-out reviews")
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_res = score(base_model, tok, items, ft_res["answers"], ft_res["logp"])
    del ft_model, base_model
    rows = [
        {"method": "fine-tune", "true_ratio": 1.0, "mb": None, "accuracy": ft_res["accuracy"], "agreement": 1.0, "kl": 0.0, "seconds": None},
        {"method": "base", "true_ratio": None, "mb": None, "accuracy": base_res["accuracy"], "agreement": base_res["agreement"], "kl": base_res["kl"], "seconds": None},
    ]
    # every method once: `raw` is lossless under its old name, `dense-exact` the old raw storage (a reference only)
    names = methods or [m for m in sorted(METHODS) if m not in ("raw", "dense-exact")]
    print(f"[3/4] compressing with {', '.join(names)} at {ratio:g}x, rebuilding and scoring")
    for name in names:
        lossless = METHODS[name].lossless if name in METHODS else False
        t0 = time.time()
        try:
            d = api.compress(base_dir, ft_dir, out / f"delta-{name}", method=name, ratio=None if lossless else ratio, overwrite=True, device="cpu")
        except BudgetError as e:
            print(f"  {name}: skipped ({e})")
            continue
        secs = time.time() - t0
        info = api.inspect(d)
        model, _ = api.load_merged(base_dir, d, dtype=torch.float32)
        r = score(model, tok, items, ft_res["answers"], ft_res["logp"])
        del model
        rows.append(
            {"method": name, "true_ratio": info["true_ratio"], "nominal_ratio": info["nominal_ratio"], "mb": info["total_bytes"] / 1e6,
             "accuracy": r["accuracy"], "agreement": r["agreement"], "kl": r["kl"], "seconds": secs}
        )
    print("[4/4] results (test reviews use adjectives unseen in fine-tuning)")
    print(format_table(rows))
    (out / "results.json").write_text(json.dumps({"ratio": ratio, "steps": steps, "n_test": n_test, "rows": rows}, indent=1))
    plot(rows, out / "demo.png", ratio)
    print(f"wrote {out / 'results.json'} and {out / 'demo.png'}")
    return rows


def format_table(rows) -> str:
    head = f"{'method':<12} {'true ratio':>10} {'size MB':>8} {'accuracy':>9} {'agree':>6} {'KL':>9} {'secs':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tr = f"{r['true_ratio']:.2f}x" if r["true_ratio"] else "-"
        mb = f"{r['mb']:.2f}" if r["mb"] else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] else "-"
        lines.append(f"{r['method']:<12} {tr:>10} {mb:>8} {r['accuracy']:>9.3f} {r['agreement']:>6.2f} {r['kl']:>9.4f} {secs:>6}")
    return "\n".join(lines)


def plot(rows, path: Path, ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = [r for r in rows if r["method"] not in ("fine-tune", "base")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r['method']}\n{r['true_ratio']:.1f}x" for r in comp]
    a1.bar(names, [r["accuracy"] for r in comp], color="tab:blue")
    ft_acc = next(r["accuracy"] for r in rows if r["method"] == "fine-tune")
    base_acc = next(r["accuracy"] for r in rows if r["method"] == "base")
    a1.axhline(ft_acc, color="k", ls="--", label=f"fine-tune {ft_acc:.2f}")
    a1.axhline(base_acc, color="r", ls=":", label=f"base {base_acc:.2f}")
    a1.set_ylabel("task accuracy")
    a1.set_ylim(0, 1.05)
    a1.legend(loc="lower right")
    a2.bar(names, [r["kl"] for r in comp], color="tab:orange")
    a2.set_ylabel("KL(fine-tune || rebuilt)")
    a2.set_yscale("log")
    fig.suptitle(f"deltapack demo: SmolLM2-135M-Instruct fine-tune at a {ratio:g}x target (true ratio under each bar)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

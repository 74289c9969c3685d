"""deltapack eval: exact match (batched, left-padded greedy == one-by-one greedy), KL, perplexity, the CLI on a delta
dir and on a merged dir, plots, and the lm-evaluation-harness wrapper on a local YAML task. Pico models with a
word-level tokenizer built here (no downloads)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import make_finetune, make_llama
from deltapack.errors import InputError
from deltapack.eval.metrics import exact_match, greedy_generate, kl_to_reference, perplexity, stop_token_ids
from deltapack.eval.tasks import Example, answer_matches, encode_example, load_task, prompt_ids, write_jsonl

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = [str(i) for i in range(10)] + [
    "+", "-", "=", "?", "what", "is", "the", "sum", "of", "and", "a", "b", "c", "x", "y", "yes", "no", "cat", "dog",
    "red", "blue", "big", "small", "one", "two", "three", "four", "five",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = WORDS[:30]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """Pico base + fine-tune (vocab 64) with the word-level tokenizer saved next to both."""
    d = tmp_path_factory.mktemp("evalpico")
    make_llama(d / "base", hidden=64, layers=2, vocab=64)
    make_finetune(d / "base", d / "ft", scale=0.5, seed=5)
    tok = make_tokenizer()
    tok.save_pretrained(d / "base")
    tok.save_pretrained(d / "ft")
    return d


def load_fp32(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def greedy_one_by_one(model, tok, ids: list[int], max_new: int) -> list[int]:
    """Reference decoder: no padding, no cache, full forward each step."""
    stops = set(stop_token_ids(model, tok))
    seq, out = list(ids), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


# ---- tasks and matching ---------------------------------------------------------------------------------------------
def test_answer_match_rule():
    assert answer_matches("  42\n", "42")
    assert not answer_matches("42.", "42")
    assert not answer_matches("The answer is 42", "42")
    assert not answer_matches("42\nbecause 6*7", "42")
    assert answer_matches("\n42\nbecause 6*7", "42", first_line=True)
    assert not answer_matches('{"a": 1}', '{"a":1}')  # JSON compared byte for byte


def test_load_task_errors(tmp_path):
    good = write_jsonl(tmp_path / "t.jsonl", [Example("p", "a"), {"prompt": "q", "answer": 7, "extra": 1}])
    task = load_task(good)
    assert task.name == "t" and [e.answer for e in task.examples] == ["a", "7"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_task(bad)
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_task(tmp_path / "broken.jsonl")
    with pytest.raises(InputError, match="not found"):
        load_task(tmp_path / "missing.jsonl")


def test_encode_example_uses_chat_template():
    tok = make_tokenizer()
    p, c = encode_example(tok, Example("what is 3 + 4 ?", "7"), chat=True)
    assert tok.convert_ids_to_tokens(p) == ["<|user|>", "what", "is", "3", "+", "4", "?", "<|assistant|>"]
    assert tok.convert_ids_to_tokens(c) == ["7", "</s>"]
    assert tok.convert_ids_to_tokens(prompt_ids(tok, "what is", chat=False)) == ["what", "is"]


# ---- metrics --------------------------------------------------------------------------------------------------------
def test_batched_greedy_equals_one_by_one(pico):
    model, tok = load_fp32(pico / "ft")
    prompts = random_prompts(11, seed=1)
    ids = [prompt_ids(tok, p, chat=True) for p in prompts]
    assert len({len(i) for i in ids}) > 3  # left padding really happens
    want = [greedy_one_by_one(model, tok, i, 6) for i in ids]
    got = greedy_generate(model, tok, ids, max_new_tokens=6, batch_size=4)
    assert got == want
    assert any(len(w) > 0 for w in want)

    answers = [tok.decode(w, skip_special_tokens=True) for w in want]
    examples = [Example(p, a) for p, a in zip(prompts, answers)]
    em = exact_match(model, tok, examples, max_new_tokens=6, batch_size=4)
    assert (em.correct, em.total, em.accuracy) == (11, 11, 1.0)
    wrong = [Example(p, a + " cat") for p, a in zip(prompts, answers)]
    assert exact_match(model, tok, wrong, max_new_tokens=6, batch_size=5).correct == 0
    # half right, half wrong: accuracy counts exactly
    mixed = examples[:5] + wrong[5:]
    em_mixed = exact_match(model, tok, mixed, max_new_tokens=6, batch_size=3)
    assert em_mixed.accuracy == pytest.approx(5 / 11)
    assert em_mixed.per_item == [True] * 5 + [False] * 6  # in example order, whatever the batching


def test_kl_zero_to_itself_and_matches_manual(pico):
    ft, tok = load_fp32(pico / "ft")
    base, _ = load_fp32(pico / "base")
    examples = [Example(p, a) for p, a in zip(random_prompts(6, seed=2), ["3", "cat dog", "yes", "1 2 3", "no", "x"])]
    assert kl_to_reference(ft, ft, tok, examples, batch_size=4).kl == pytest.approx(0.0, abs=1e-7)
    res = kl_to_reference(base, ft, tok, examples, batch_size=4)

    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            p, c = encode_example(tok, e, chat=True)
            seq = torch.tensor([p + c])
            lr = F.log_softmax(ft(seq).logits[0].float(), -1)
            lm = F.log_softmax(base(seq).logits[0].float(), -1)
            for t in range(len(p) - 1, len(p) + len(c) - 1):
                total += float((lr[t].exp() * (lr[t] - lm[t])).sum())
                count += 1
    assert res.tokens == count == sum(len(encode_example(tok, e, True)[1]) for e in examples)
    assert res.kl == pytest.approx(total / count, rel=1e-4)
    assert res.kl > 1e-3


def test_perplexity_matches_model_loss(pico):
    model, tok = load_fp32(pico / "base")
    text = " ".join(random_prompts(40, seed=3))
    n_tok = len(tok(text, add_special_tokens=False)["input_ids"])
    res = perplexity(model, tok, text, seq_len=32, batch_size=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 32):
            w = ids[i : i + 32]
            if len(w) < 2:
                continue
            loss = model(torch.tensor([w]), labels=torch.tensor([w])).loss
            nll += float(loss) * (len(w) - 1)
            count += len(w) - 1
    assert res.tokens == count and count >= n_tok - math.ceil(n_tok / 32)
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _task_file(pico: Path, path: Path, n: int = 8) -> Path:
    """Answers = the fine-tune's own greedy outputs for half the prompts, so accuracies are known in advance."""
    model, tok = load_fp32(pico / "ft")
    prompts = random_prompts(n, seed=4)
    recs = []
    for i, p in enumerate(prompts):
        out = greedy_one_by_one(model, tok, prompt_ids(tok, p, True), 5)
        ans = tok.decode(out, skip_special_tokens=True)
        recs.append({"prompt": p, "answer": ans if i % 2 == 0 else ans + " blue"})
    return write_jsonl(path, recs)


def test_cli_eval_delta_merged_plot_json(pico, tmp_path):
    from deltapack import api
    from deltapack.cli import main

    tasks = _task_file(pico, tmp_path / "echo.jsonl")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random_prompts(30, seed=6)))
    raw = api.compress(pico / "base", pico / "ft", tmp_path / "raw", method="raw", progress=False)
    low = api.compress(pico / "base", pico / "ft", tmp_path / "low", method="lowrank", ratio=2, progress=False)
    runner = CliRunner()
    common = ["--tasks", str(tasks), "--reference", str(pico / "ft"), "--device", "cpu", "--max-new-tokens", "5", "--quiet"]

    # --numerics merged: the rebuilt checkpoint itself (served numerics add the lossless delta in fp32: rounding-close)
    r = runner.invoke(main, ["eval", str(pico / "base"), str(raw), *common, "--numerics", "merged", "--base-accuracy", "--ppl-text", str(text),
                             "--json", str(tmp_path / "raw.json"), "--plot", str(tmp_path / "raw.png")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "raw.json").read_text())
    t = rep["tasks"]["echo"]
    assert rep["target_kind"] == "delta" and rep["delta"]["method"] == "raw"
    assert t["reference"]["accuracy"] == 0.5 and t["model"]["accuracy"] == 0.5 and t["kept"] == 1.0
    assert "base" in t and 0.0 <= t["base"]["accuracy"] <= 1.0
    assert t["kl"]["kl"] == pytest.approx(0.0, abs=1e-7)  # raw is lossless: the rebuilt model IS the fine-tune
    assert rep["perplexity"]["model"]["ppl"] == pytest.approx(rep["perplexity"]["reference"]["ppl"], rel=1e-6)
    png = (tmp_path / "raw.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "echo" in r.output and "KL" in r.output

    r = runner.invoke(main, ["eval", str(pico / "base"), str(low), *common, "--json", str(tmp_path / "low.json")])
    assert r.exit_code == 0, r.output
    low_rep = json.loads((tmp_path / "low.json").read_text())
    assert low_rep["delta"]["true_ratio"] >= 1.9
    assert low_rep["tasks"]["echo"]["kl"]["kl"] > 1e-4  # lossy: the rebuilt model differs from the fine-tune

    # a merged dir (any plain checkpoint) is loaded by transformers: the fine-tune against itself
    r = runner.invoke(main, ["eval", str(pico / "base"), str(pico / "ft"), *common, "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["target_kind"] == "checkpoint" and m["tasks"]["echo"]["kl"]["kl"] == pytest.approx(0.0, abs=1e-7)

    r = runner.invoke(main, ["eval", str(pico / "base"), str(raw)])
    assert r.exit_code == 2 and "nothing to evaluate" in r.output


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------------
def test_lm_eval_on_in_memory_model(pico, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'deltapack[eval]')")
    from deltapack.eval.harness import run_lm_eval

    model, tok = load_fp32(pico / "ft")
    rng = random.Random(7)
    choices_pool = ["cat", "dog", "red", "blue", "big", "small", "yes", "no"]
    docs = []
    for _ in range(12):
        q = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 6)))
        docs.append({"question": q, "choices": rng.sample(choices_pool, 3), "label": rng.randrange(3)})
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / "pico_mc.yaml").write_text(
        "task: pico_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    res = run_lm_eval(model, tok, ["pico_mc"], include_path=inc, batch_size=4, include_defaults=False)
    acc = res["results"]["pico_mc"]["acc,none"]

    # the same multiple-choice rule computed here: argmax over choices of sum log p(choice tokens | question)
    hits = 0
    with torch.no_grad():
        for d in docs:
            ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for ch in d["choices"]:
                cont = tok(ch, add_special_tokens=False)["input_ids"]
                lp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                scores.append(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
            hits += int(max(range(3), key=lambda i: scores[i]) == d["label"])
    assert res["n_samples"]["pico_mc"]["effective"] == 12
    assert acc == pytest.approx(hits / 12)
    json.dumps(res)  # JSON-safe

    # the same through the CLI, on the fine-tune given as a plain checkpoint dir
    from deltapack.cli import main

    r = CliRunner().invoke(main, ["eval", str(pico / "base"), str(pico / "ft"), "--device", "cpu", "--quiet",
                                  "--lm-eval", "pico_mc", "--lm-eval-include", str(inc), "--lm-eval-local-only",
                                  "--json", str(tmp_path / "lm.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lm.json").read_text())["lm_eval"]["results"]["pico_mc"]["acc,none"] == pytest.approx(acc)
    assert "lm-eval pico_mc" in r.output

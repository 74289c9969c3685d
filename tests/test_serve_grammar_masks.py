"""The batched grammar masks (deltapack.serve.grammar.GrammarMasks: persistent buffers, filled on the host apart
from their application) against a plain reference: one fresh xgrammar bitmask per row, filled by that row's matcher
alone and unpacked bit by bit here. Mixed batches (constrained and free rows, two vocabulary sizes), rows leaving
between steps, and a row whose matcher breaks, which must fail alone."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from deltapack.serve.sampling import SamplingParams, process_logits, select_tokens

xgr = pytest.importorskip("xgrammar")

W = 288  # the batch's logits width: a byte tokenizer of 260 tokens in a model with padding columns
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"},
                   "c": {"enum": ["red", "green"]}},
    "required": ["name", "n", "c"], "additionalProperties": False,
}


@dataclass
class Row:
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    vocab: int = W
    prompt_ids: list[int] = field(default_factory=lambda: [3, 4, 5])
    output_ids: list[int] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=lambda: {2})
    generator: torch.Generator | None = None
    matcher: object | None = None


@pytest.fixture(scope="module")
def grammars(tmp_path_factory):
    from transformers import AutoTokenizer

    from deltapack.serve.grammar import GrammarSpec, compile_spec
    from deltapack.serve.testing import make_byte_tokenizer

    d = tmp_path_factory.mktemp("tok")
    n = make_byte_tokenizer(d)
    tok = AutoTokenizer.from_pretrained(str(d))
    # the same schema for two tenants of different vocabulary sizes (the padded model's and the tokenizer's own)
    return {v: compile_spec(GrammarSpec("json_schema", SCHEMA, "response_format"), tok, v, {2}) for v in (W, n)} | {
        "regex": compile_spec(GrammarSpec("regex", r"[a-c]{2,5}-[0-9]+", "guided_regex"), tok, W, {2})}


def reference_mask(x: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """x masked as the sampler must: columns past a row's vocabulary, then each constrained row by its own
    matcher's single-row fill (bits unpacked here, not by xgrammar's apply kernel)."""
    y = x.clone()
    for b, r in enumerate(rows):
        y[b, r.vocab :] = float("-inf")
        if r.matcher is None:
            continue
        bm = xgr.allocate_token_bitmask(1, r.vocab)
        r.matcher.fill_next_token_bitmask(bm, 0)
        words = bm[0].to(torch.int64) & 0xFFFFFFFF
        bits = (words[:, None] >> torch.arange(32)) & 1
        allowed = bits.view(-1)[: r.vocab].bool()
        y[b, : r.vocab][~allowed] = float("-inf")
    return y


def mixed_rows(grammars, n: int, seed: int) -> list[Row]:
    """n rows: constrained (schema at both vocabulary sizes, regex) and free ones, in a shuffled order."""
    rng = random.Random(seed)
    kinds = [("free", W), ("free", 260), (W, W), (260, 260), ("regex", W)]
    rows = []
    for i in range(n):
        g, vocab = kinds[i % len(kinds)]
        rows.append(Row(vocab=vocab, matcher=None if g == "free" else xgr.GrammarMatcher(grammars[g])))
    rng.shuffle(rows)
    return rows


def test_masks_match_the_reference_over_steps(grammars):
    """Several decode steps of a mixed batch through the engine's path (one GrammarMasks reused, filled then applied
    as select_tokens does) give exactly the reference's masked logits and tokens; rows leave between steps, so the
    persistent buffers' rows are reused by other requests."""
    from deltapack.serve.grammar import GrammarMasks

    masks = GrammarMasks("cpu")
    rows = mixed_rows(grammars, 13, seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.randn(len(rows), W, generator=gen) * 4
        want = reference_mask(x, rows)
        got = x.clone()
        process_logits(got, rows, masks.fill(rows))
        assert not masks.errors
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"step {step}"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        toks, errors = select_tokens(x, rows, masks.fill(rows))
        assert not errors
        assert toks == want.argmax(-1).tolist()
        for r, t in zip(rows, toks):
            if r.matcher is not None:
                assert r.matcher.accept_token(t)
            r.output_ids.append(t)
        if step % 3 == 1:  # two rows finish: the others move up, into buffer rows another request filled before
            rows = rows[1:5] + rows[6:]
        if step == 6:  # and new ones join at the end
            rows += mixed_rows(grammars, 3, seed=1)


def test_default_path_matches_the_reference(grammars):
    """select_tokens / process_logits with no masks given (the prefill, tests) fill a per-thread GrammarMasks."""
    rows = mixed_rows(grammars, 9, seed=2)
    x = torch.randn(len(rows), W, generator=torch.Generator().manual_seed(1)) * 4
    want = reference_mask(x, rows)
    got = x.clone()
    process_logits(got, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    toks, errors = select_tokens(x, rows)
    assert not errors and toks == want.argmax(-1).tolist()


class BrokenMatcher:
    """A matcher whose fill fails (a bug, a corrupted state): only its row may fail."""

    def fill_next_token_bitmask(self, bitmask, index=0):
        raise RuntimeError("broken matcher")


def test_a_broken_matcher_fails_its_row_alone(grammars):
    from deltapack.serve.grammar import GrammarMasks

    masks = GrammarMasks("cpu")
    rows = mixed_rows(grammars, 8, seed=3)
    bad = next(b for b, r in enumerate(rows) if r.matcher is not None and r.vocab == W)
    rows[bad].matcher = BrokenMatcher()
    x = torch.randn(len(rows), W, generator=torch.Generator().manual_seed(2)) * 4
    toks, errors = select_tokens(x, rows, masks.fill(rows))
    assert set(errors) == {bad} and errors[bad].status == 500 and "broken matcher" in errors[bad].message
    assert toks[bad] == -1
    others = [b for b in range(len(rows)) if b != bad]
    rows[bad].matcher = None  # the reference for the others: the broken row's mask does not matter
    want = reference_mask(x, rows).argmax(-1).tolist()
    assert [toks[b] for b in others] == [want[b] for b in others]


def test_a_failing_processor_retry_keeps_masks(grammars):
    """When a processor fails for one row, select_tokens redoes the rows one by one: each constrained row must
    still get its own mask (its batch row of the filled buffers), not its neighbour's or none."""
    from deltapack.serve.grammar import GrammarMasks

    masks = GrammarMasks("cpu")
    rows = mixed_rows(grammars, 7, seed=4)
    bad = next(b for b, r in enumerate(rows) if r.matcher is None)
    rows[bad].params = SamplingParams(temperature=0, allowed_token_ids=[10**6])  # an index error in its processor
    x = torch.randn(len(rows), W, generator=torch.Generator().manual_seed(3)) * 4
    toks, errors = select_tokens(x, rows, masks.fill(rows))
    assert set(errors) == {bad}
    want = reference_mask(x, rows).argmax(-1).tolist()
    assert [t for b, t in enumerate(toks) if b != bad] == [t for b, t in enumerate(want) if b != bad]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_engine_batch_gives_each_request_its_alone_output(tmp_path, decode):
    """Through the server: constrained requests (two schemas, a regex) and a free one admitted in one batch give
    exactly the greedy output each gives alone (masks filled by the engine while the step runs, batch rows masked
    in place by their own buffer rows), in both decode bookkeepings."""
    import json

    import httpx
    from conftest import make_llama

    from deltapack.serve.testing import admitted_together, make_byte_tokenizer, running_server

    make_llama(tmp_path / "base", hidden=64, vocab=W, dtype=torch.float32)
    make_byte_tokenizer(tmp_path / "base")
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}, "k": {"enum": ["x", "yy"]}},
             "required": ["ok", "k"], "additionalProperties": False}
    bodies = [{"guided_json": SCHEMA}, {}, {"guided_regex": r"[a-c]{2,5}-[0-9]{1,3}"}, {"guided_json": other},
              {"guided_json": SCHEMA}]
    with running_server(tmp_path / "base", max_batch=8, decode=decode) as (state, url), httpx.Client(base_url=url, timeout=120) as http:
        def call(i):
            r = http.post("/v1/completions", json={"model": "base", "prompt": f"item {i}:", "max_tokens": 40,
                                                   "temperature": 0, **bodies[i]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        alone = [call(i) for i in range(len(bodies))]
        together = admitted_together(state, [lambda i=i: call(i) for i in range(len(bodies))])
    for i, (a, t) in enumerate(zip(alone, together)):
        assert not isinstance(t, Exception), t
        assert t["text"] == a["text"], f"request {i}"
        if "guided_json" in bodies[i] and a["finish_reason"] == "stop":
            json.loads(a["text"])

"""The sampler's logits processors against transformers' own (the semantics vLLM and transformers share), and
per-row isolation: a row with NaN logits or an impossible constraint fails alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from deltapack.serve.sampling import (
    SamplingParams,
    filter_logits,
    process_logits,
    select_tokens,
)


@dataclass
class Row:
    params: SamplingParams
    vocab: int = 50
    prompt_ids: list[int] = field(default_factory=lambda: [3, 4, 5])
    output_ids: list[int] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=lambda: {2})
    generator: torch.Generator | None = None
    matcher: object | None = None


def _logits(b=4, w=50, seed=0):
    return torch.randn(b, w, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = _logits(1)
    row = Row(SamplingParams(repetition_penalty=1.7), output_ids=[7, 7, 9])
    ours = x.clone()
    process_logits(ours, [row])
    ids = torch.tensor([row.prompt_ids + row.output_ids])
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, x.clone())
    torch.testing.assert_close(ours, want)


def test_min_p_and_top_k_match_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    x = _logits(1)[0]
    ids = torch.zeros(1, 1, dtype=torch.long)
    want = MinPLogitsWarper(0.2)(ids, TemperatureLogitsWarper(0.7)(ids, x[None].clone()))[0]
    got = filter_logits(x, 0.7, 0, 1.0, 0.2)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    want_k = TopKLogitsWarper(5)(ids, x[None].clone())[0]
    assert torch.equal(torch.isinf(filter_logits(x, 1.0, 5, 1.0)), torch.isinf(want_k))


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_matches_transformers(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    x = _logits(1, seed=3)[0]
    ids = torch.zeros(1, 1, dtype=torch.long)
    want = TopPLogitsWarper(top_p)(ids, x[None].clone())[0]
    assert torch.equal(torch.isinf(filter_logits(x, 1.0, 0, top_p)), torch.isinf(want))


def test_tiny_top_p_keeps_the_best_token():
    x = _logits(1)[0]
    kept = ~torch.isinf(filter_logits(x, 1.0, 0, 1e-45))
    assert kept.sum() == 1 and kept[x.argmax()]


def test_presence_frequency_logit_bias_allowed_min_tokens():
    x = _logits(1)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={10: 4.0, 11: -4.0}, min_tokens=4,
                       stop_token_ids=[12])
    row = Row(p, output_ids=[7, 7, 9])
    got = x.clone()
    process_logits(got, [row])
    want = x.clone()
    want[0, 10] += 4.0
    want[0, 11] -= 4.0
    want[0, 7] -= 0.25 * 2 + 0.5
    want[0, 9] -= 0.25 + 0.5
    want[0, 2] = float("-inf")  # EOS and stop ids masked before min_tokens
    want[0, 12] = float("-inf")
    torch.testing.assert_close(got, want)
    row.output_ids = [7, 7, 9, 1]  # min_tokens reached: EOS allowed again
    again = x.clone()
    process_logits(again, [row])
    assert torch.isfinite(again[0, 2])
    allowed = Row(SamplingParams(allowed_token_ids=[5, 6]))
    y = x.clone()
    process_logits(y, [allowed])
    assert torch.isfinite(y[0]).nonzero().view(-1).tolist() == [5, 6]


def test_processors_touch_only_their_rows():
    x = _logits(3)
    rows = [Row(SamplingParams(temperature=0)), Row(SamplingParams(temperature=0, repetition_penalty=3.0, logit_bias={1: 9.0})),
            Row(SamplingParams(temperature=0), vocab=40)]
    got = x.clone()
    process_logits(got, rows)
    torch.testing.assert_close(got[0], x[0])
    assert not torch.equal(got[1], x[1])
    assert torch.isinf(got[2, 40:]).all() and torch.equal(got[2, :40], x[2, :40])


def test_a_broken_row_fails_alone():
    x = _logits(4)
    x[1, 7] = float("nan")
    rows = [Row(SamplingParams(temperature=0)), Row(SamplingParams(temperature=0)),
            Row(SamplingParams(temperature=1.0, seed=1)), Row(SamplingParams(temperature=0, allowed_token_ids=[3], min_tokens=2), eos_ids={3})]
    rows[2].generator = rows[2].params.make_generator(torch.device("cpu"))
    toks, errors = select_tokens(x, rows)
    assert set(errors) == {1, 3}
    assert errors[1].status == 500 and "non-finite" in errors[1].message
    assert errors[3].status == 400 and "no token is allowed" in errors[3].message
    assert toks[0] == int(x[0].argmax()) and 0 <= toks[2] < 50 and toks[1] == toks[3] == -1
    assert torch.isnan(x[1, 7])  # the caller's logits are not modified


def test_grammar_mask_applies_to_constrained_rows_only():
    pytest.importorskip("xgrammar")
    import tempfile

    from deltapack.serve.grammar import GrammarSpec, compile_spec, new_matcher
    from deltapack.serve.testing import make_byte_tokenizer

    with tempfile.TemporaryDirectory() as d:
        make_byte_tokenizer(d)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
    g = compile_spec(GrammarSpec("choice", ["ab", "ba"], "guided_choice"), tok, 288, {2})
    x = _logits(3, w=288)
    rows = [Row(SamplingParams(temperature=0), vocab=288), Row(SamplingParams(temperature=0), vocab=288),
            Row(SamplingParams(temperature=0), vocab=260)]
    rows[1].matcher = new_matcher(g)
    got = x.clone()
    process_logits(got, rows)
    torch.testing.assert_close(got[0], x[0])
    assert torch.isfinite(got[1]).nonzero().view(-1).tolist() == [4 + ord("a"), 4 + ord("b")]
    assert torch.isinf(got[2, 260:]).all()

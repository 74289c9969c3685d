"""Self-calibration text generation (the default calibration of `auto`): it reaches the token count asked for in
few, wide generate calls, even when replies end long before max_new_tokens, and it is deterministic."""

from __future__ import annotations

import torch

from deltapack.calib.data import self_calibration_texts


class _Tok:
    """A word-per-token stand-in with a chat template: enough for self_calibration_texts."""

    chat_template = "stub"
    eos_token, eos_token_id = "</s>", 0

    def __init__(self):
        self.padding_side, self.pad_token, self.pad_token_id = "right", None, None

    def apply_chat_template(self, conv, add_generation_prompt=False, return_tensors=None, padding=False,
                            return_dict=False, tokenize=True):
        if not tokenize:
            return " ".join(f"<{m['role']}> {m['content']}" for m in conv)
        rows = [[1 + (len(m["content"]) % 50) for m in c] + [2] for c in conv]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def decode(self, row, skip_special_tokens=True):
        return " ".join(f"w{int(t)}" for t in row if int(t) != 0)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


class _Model(torch.nn.Module):
    """Samples `reply_len` random words then pads with EOS: replies far shorter than max_new_tokens."""

    def __init__(self, reply_len: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.reply_len, self.calls = reply_len, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        self.calls.append(input_ids.shape[0])
        new = torch.randint(3, 60, (input_ids.shape[0], max_new_tokens))
        new[:, self.reply_len:] = pad_token_id
        return torch.cat([input_ids, new], 1)


def test_short_replies_reach_the_token_count_in_few_wide_calls():
    tok, model = _Tok(), _Model(reply_len=20)
    texts = self_calibration_texts(model, tok, n_tokens=2000, max_new_tokens=160, batch=32)
    total = sum(len(t.split()) for t in texts)
    assert total >= 2000
    assert max(model.calls) <= 32
    # the first call assumes full-length replies (184 tokens: 11 rows); then the measured mean (~25) sizes the rest
    assert len(model.calls) <= 4, model.calls
    assert total < 2000 + 32 * 30  # no more than one batch beyond what was asked
    assert tok.padding_side == "right" and tok.pad_token is None  # the tokenizer is left as it was


def test_same_seed_same_texts():
    a = self_calibration_texts(_Model(20), _Tok(), n_tokens=500, seed=3, batch=8)
    b = self_calibration_texts(_Model(20), _Tok(), n_tokens=500, seed=3, batch=8)
    c = self_calibration_texts(_Model(20), _Tok(), n_tokens=500, seed=4, batch=8)
    assert a == b and a != c


def test_replies_are_kept_for_the_next_run_on_the_same_finetune(tmp_path, monkeypatch):
    """A second compression of the same fine-tune (another ratio or method) reuses the first one's replies instead of
    generating them again; a rewritten checkpoint, other arguments or a corrupt cache file generate anew."""
    import os
    from types import SimpleNamespace

    from deltapack.calib.data import cached_self_calibration_texts

    monkeypatch.setenv("DELTAPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DELTAPACK_NO_CALIB_CACHE", raising=False)
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").write_bytes(b"weights")
    source = SimpleNamespace(path=ft)
    tok, model = _Tok(), _Model(reply_len=20)
    first = cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=0)
    calls = len(model.calls)
    assert calls and cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=0) == first
    assert len(model.calls) == calls  # reused: no generation
    files = list((tmp_path / "cache" / "calib").glob("*.json"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "calib").glob("*.part"))
    cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=1)  # other arguments: generated
    assert len(model.calls) > calls
    calls = len(model.calls)
    st = (ft / "model.safetensors").stat()
    os.utime(ft / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint rewritten
    cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=0)
    assert len(model.calls) > calls
    calls = len(model.calls)
    for f in (tmp_path / "cache" / "calib").glob("*.json"):
        f.write_text("{not json")
    again = cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=0)  # unreadable: generated again
    assert len(model.calls) > calls and again
    monkeypatch.setenv("DELTAPACK_NO_CALIB_CACHE", "1")
    calls = len(model.calls)
    cached_self_calibration_texts(source, model, tok, n_tokens=500, seed=0)
    assert len(model.calls) > calls

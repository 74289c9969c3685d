"""Tiny random Llama checkpoints with a character-level tokenizer, for CPU smoke runs and tests of the full
pipeline (the CLI needs a tokenizer; the test fixtures' pico models have none)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.ascii_lowercase + string.digits + " .,:;'\"()[]=+-*/_\n?!#"  # 60 symbols


def save_char_tokenizer(path: str | Path, vocab_size: int = 64) -> None:
    """A WordLevel tokenizer over single characters (lower-cased; unknown characters -> <unk>), ≤ vocab_size ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>"]
    symbols = specials + list(CHARS)[: vocab_size - len(specials)]
    vocab = {s: i for i, s in enumerate(symbols)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(str(path))


def make_pico(path: str | Path, *, hidden: int = 64, layers: int = 6, vocab: int = 64, seed: int = 0,
              dtype: torch.dtype = torch.float32, tie: bool = False):
    """Save a random Llama (config, safetensors, char tokenizer) at `path`; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(path), safe_serialization=True)
    save_char_tokenizer(path, vocab)
    return model

"""Tokenizer: the checkpoint's tokenizer.json path and the built-in byte fallback."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers import decoders as tk_decoders

from workers.model import tokens
from workers.model.tokenizer import FALLBACK_BAD_TOKEN_IDS, ByteTokenizer, HFTokenizer, load_tokenizer


def _write_hf_tokenizer(model_dir: Path, bad_token_ids: list[int] | None) -> None:
    """A tiny word-level tokenizer with two added special tokens at their real ids."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = tk_decoders.WordPiece()
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        {"id": tokens.LISTEN, "content": "<|listen|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": tokens.SPEAK, "content": "<|speak|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ]
    data["model"]["vocab"].update({"<|listen|>": tokens.LISTEN, "<|speak|>": tokens.SPEAK})
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    if bad_token_ids is not None:
        (model_dir / "tokenizer_config.json").write_text(json.dumps({"bad_token_ids": bad_token_ids}))


def test_hf_tokenizer_from_model_dir(tmp_path: Path) -> None:
    _write_hf_tokenizer(tmp_path, bad_token_ids=[2, 7])
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
    assert tok.encode("hello<|speak|>") == [1, tokens.SPEAK]
    assert tok.decode([1, tokens.SPEAK, 2, tokens.LISTEN]) == "hello world"
    assert tok.bad_token_ids == [2, 7]


def test_hf_tokenizer_without_config_uses_fallback_bad_ids(tmp_path: Path) -> None:
    _write_hf_tokenizer(tmp_path, bad_token_ids=None)
    assert load_tokenizer(tmp_path).bad_token_ids == list(FALLBACK_BAD_TOKEN_IDS)


def test_fallback_when_no_tokenizer_files(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_byte_tokenizer_round_trip_and_special_ids() -> None:
    tok = ByteTokenizer()
    text = "Streaming Omni Conversation. Grüße"
    ids = tok.encode(text)
    assert all(i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode("a<|listen|>b<unit>") == [ord("a"), tokens.LISTEN, ord("b"), tokens.UNIT_START]
    assert tok.decode([ord("h"), tokens.SPEAK, ord("i"), tokens.TURN_EOS]) == "hi"


def test_byte_tokenizer_decodes_other_ids_to_visible_words() -> None:
    tok = ByteTokenizer()
    words = [tok.decode([i]) for i in (300, 301, 90000, 151000)]
    assert all(w.startswith(" ") and 2 <= len(w) <= 5 for w in words)
    assert tok.decode([300]) == tok.decode([300])  # deterministic
    assert len(set(words)) == len(words)
    assert 7 in tok.bad_token_ids and 127 in tok.bad_token_ids
    assert not {ord("a"), ord(" "), ord("\n")} & set(tok.bad_token_ids)

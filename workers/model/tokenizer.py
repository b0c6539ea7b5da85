"""Text tokenizer: the checkpoint's `tokenizer.json` when present, else a built-in byte-level fallback.

Both expose the same small interface used by the engine: `encode(text) -> ids` (no extra special
tokens), `decode(ids) -> text` (special tokens removed) and `bad_token_ids` (ids masked at every
duplex decode step, MODEL.md §3.1).

The fallback keeps the real special-token ids of `tokens.py`, so the duplex token layout is identical
with and without tokenizer files. Bytes map to ids 0..255; every other ordinary id (a random-weight
model samples from the whole 151 748-row vocabulary) decodes to a short synthetic word, so generated
text has a visible length and the 28-character cap is exercised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

from workers.model import tokens

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The first ranges of the MiniCPM-o bad_token_ids (MODEL.md §3.1; the full list has 6 965 ids), used for a
# tokenizer.json that comes without tokenizer_config.json.
FALLBACK_BAD_TOKEN_IDS: tuple[int, ...] = (7, 8, *range(94, 188), 198, 201, *range(222, 256))
# Byte fallback: ASCII control bytes except tab and newline.
BYTE_BAD_TOKEN_IDS: tuple[int, ...] = (*range(0, 9), *range(11, 32), 127)

_SYNTHETIC_LETTERS = "etaoinshrdlucmfw"


class TextTokenizer(Protocol):
    bad_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """The checkpoint's fast tokenizer (`tokenizers` library)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        self.bad_token_ids: list[int] = _read_bad_token_ids(model_dir)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if not tokens.is_control(i)], skip_special_tokens=True)


class ByteTokenizer:
    """Built-in fallback: UTF-8 bytes as ids 0..255, special tokens at their real ids."""

    def __init__(self) -> None:
        self.bad_token_ids: list[int] = list(BYTE_BAD_TOKEN_IDS)
        self._special_by_text = {text: token_id for token_id, text in tokens.NAMED_ADDED_TOKENS.items()}
        names = sorted(self._special_by_text, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._special_pattern.split(text):
            if piece in self._special_by_text:
                ids.append(self._special_by_text[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for token_id in ids:
            if token_id < 256:
                out.append(token_id)
            elif not tokens.is_control(token_id):
                out.extend(_synthetic_word(token_id).encode("ascii"))
        return out.decode("utf-8", errors="replace")


def _synthetic_word(token_id: int) -> str:
    """A deterministic 1-4 letter word with a leading space for an id the byte tokenizer never emits."""
    letters = []
    value = token_id
    for _ in range(1 + token_id % 4):
        letters.append(_SYNTHETIC_LETTERS[value % len(_SYNTHETIC_LETTERS)])
        value //= len(_SYNTHETIC_LETTERS)
    return " " + "".join(letters)


def _read_bad_token_ids(model_dir: Path) -> list[int]:
    """`bad_token_ids` of tokenizer_config.json; the fixed fallback list when the file or key is absent."""
    config_path = model_dir / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return [int(i) for i in config.get("bad_token_ids", FALLBACK_BAD_TOKEN_IDS)]


def load_tokenizer(model_path: str | Path | None) -> TextTokenizer:
    """The checkpoint tokenizer if `model_path` holds a tokenizer.json, otherwise the byte fallback."""
    if model_path is not None and (Path(model_path) / TOKENIZER_FILE).exists():
        return HFTokenizer(Path(model_path))
    return ByteTokenizer()

"""Text tokenizer: a thin wrapper over a `tokenizers` `tokenizer.json`.

The same class serves the Flan-T5 fast tokenizer (its `tokenizer.json`) and the small tokenizer of the
tiny preset, trained here with `tokenizers`. Ids follow T5: pad 0 (also the decoder start), eos 1, unk 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# letters, digits and their combining marks (a decomposed "é"), joined by inner apostrophes or hyphens ("don't",
# "x-ray"); quotes and dashes around a word are not part of it
WORD_PATTERN = regex.compile(r"[\w\p{M}]+(?:['\u2019-][\w\p{M}]+)*")


class Tokenizer:
    """Encode text to ids with character offsets, decode ids to text with per-token character spans."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, EOS_ID, UNK_ID)):
            got = tokenizer.token_to_id(token)
            if got != expected:
                raise ValueError(f"tokenizer must map {token!r} to id {expected} (T5 convention), got {got}")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a `tokenizers` tokenizer.json)")
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
        """Train a small T5-style (metaspace, lowercased) BPE tokenizer on `texts`."""
        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids + [EOS_ID] if add_eos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (no eos) and the (start, end) character span of each token in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in ids if i not in (PAD_ID, EOS_ID)], skip_special_tokens=True)

    def decode_with_spans(self, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """Decoded text and, per id, the character span it produced in that text (empty for specials)."""
        spans, prev = [], ""
        for i in range(len(ids)):
            text = self.decode(ids[: i + 1])
            start = len(prev) if text.startswith(prev) else min(len(prev), len(text))
            while start < len(text) and text[start] == " ":
                start += 1
            spans.append((min(start, len(text)), len(text)))
            prev = text
        return prev, spans


def words_with_tokens(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """Group tokens into words: (start, end, token indices) for each word in `text`.

    A word is a run of letters, digits and combining marks, with apostrophes or hyphens inside it (`WORD_PATTERN`);
    punctuation, and quotes or dashes around a word, belong to no word.
    A token belongs to every word its span overlaps.
    """
    words = []
    for m in WORD_PATTERN.finditer(text):
        members = [i for i, (s, e) in enumerate(spans) if s < m.end() and e > m.start()]
        if members:
            words.append((m.start(), m.end(), members))
    return words

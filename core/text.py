"""Text in, one contract: the tokenizer prepare trains on the training split (Hugging Face `tokenizers`), saved as
its JSON with the data and the model, and the one function that turns strings into the model's token ids. Prepare,
the server and `tuneline predict` all call `encode`, so a sentence is tokenized the same way everywhere.

The tokenizer is word-level: lower-cased, Unicode-normalised (NFKC), split on whitespace and punctuation; words
seen fewer than `min_frequency` times in training become [UNK]. Its JSON holds the normaliser, the
pre-tokenizer, the vocabulary, and padding and truncation to `max_length`, so loading it restores all of them.
Nothing here imports PyTorch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

PAD, UNK = "[PAD]", "[UNK]"
MAX_TEXT_BYTES = 64 * 1024  # a sentence classifier's input: far above any sentence, far below a memory problem


class TextError(ValueError):
    """A text that cannot be used; the message says what is wrong and what to send instead."""


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer and its identity (sha256 of its JSON)."""

    json: str
    sha256: str
    max_length: int
    pad_id: int
    vocab_size: int
    _impl: object

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        impl = HFTokenizer.from_str(text)
        padding, truncation = impl.padding, impl.truncation
        if not padding or not truncation or padding.get("length") is None:
            raise TextError("tokenizer: its JSON sets no fixed padding and truncation; re-run `tuneline stage prepare`")
        return cls(json=text, sha256=sha256_text(text), max_length=int(padding["length"]),
                   pad_id=int(padding["pad_id"]), vocab_size=int(impl.get_vocab_size()), _impl=impl)

    def encode(self, texts: list[str]) -> np.ndarray:
        """int64 token ids [len(texts), max_length], padded and truncated at the end."""
        encodings = self._impl.encode_batch(list(texts))
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_counts(texts: list[str]) -> list[int]:
    """Tokens per text before padding and truncation, as train_tokenizer's normaliser and splitter see them."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return [len(splitter.pre_tokenize_str(normalizer.normalize_str(t))) for t in texts]


def train_tokenizer(texts, max_length: int, vocab_size: int, min_frequency: int) -> Tokenizer:
    """A word-level tokenizer trained on `texts` (an iterable of strings: the training split only)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    impl = HFTokenizer(models.WordLevel(unk_token=UNK))
    impl.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    impl.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK])
    impl.train_from_iterator(texts, trainer=trainer)
    pad_id = impl.token_to_id(PAD)
    impl.enable_padding(pad_id=pad_id, pad_token=PAD, length=max_length, direction="right")
    impl.enable_truncation(max_length=max_length, direction="right")
    return Tokenizer.from_json(impl.to_str())


def check_text(value: object, where: str = "text") -> str:
    """`value` as a usable string, else TextError: bytes must be UTF-8, and the text non-empty and not oversized."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) > MAX_TEXT_BYTES:
            raise TextError(f"{where}: {len(raw)} bytes; at most {MAX_TEXT_BYTES} bytes of UTF-8 text per row")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextError(f"{where}: not valid UTF-8 (byte {exc.start}): send UTF-8 text") from None
    if not isinstance(value, str):
        raise TextError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
        raise TextError(f"{where}: more than {MAX_TEXT_BYTES} bytes; at most {MAX_TEXT_BYTES} bytes of UTF-8 text per row")
    if not value.strip():
        raise TextError(f"{where}: empty: send at least one word")
    return value

"""Text in, one contract: the tokenizer prepare trains on the training split (Hugging Face `tokenizers`), saved as
its JSON with the data and the model, and the one function that turns strings into the model's token ids. Prepare,
the server and `tuneline predict` all call `encode`, so a sentence is tokenized the same way everywhere.

Texts are lower-cased, Unicode-normalised (NFKC) and split on whitespace and punctuation; then data.tokenizer
says what an id is: a word (words seen fewer than `min_frequency` times in training become [UNK]) or a WordPiece
(frequent words whole, rarer ones as pieces). Its JSON holds the normaliser, the
pre-tokenizer, the vocabulary, and padding and truncation to `max_length`, so loading it restores all of them.
Nothing here imports PyTorch.
"""

from __future__ import annotations

import hashlib
import math
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


TOKENIZER_KINDS = {"word": "wordlevel", "wordpiece": "wordpiece"}  # data.tokenizer -> Hugging Face model type


def train_tokenizer(texts: list[str], max_length: int | None, vocab_size: int, min_frequency: int,
                    kind: str = "word") -> Tokenizer:
    """A tokenizer trained on `texts` (the training split only), fixed to `max_length` ids per text.

    kind "word": one id per word (words seen fewer than `min_frequency` times become [UNK]); "wordpiece": frequent
    words whole, the rest as pieces of words ("unwatchable" -> "un", "##watch", "##able"), so a word never seen in
    training still reaches the model through its parts. max_length None: the training texts' 99th-percentile count
    of this tokenizer's own tokens, rounded up to 8 (at least 8).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if kind == "word":
        impl = HFTokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK],
                                            show_progress=False)
    elif kind == "wordpiece":
        impl = HFTokenizer(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=[PAD, UNK], show_progress=False)
    else:
        raise TextError(f"data.tokenizer: unknown kind {kind!r}: use one of {', '.join(TOKENIZER_KINDS)}")
    impl.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    impl.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    impl.train_from_iterator(texts, trainer=trainer)
    if max_length is None:
        counts = [len(e.ids) for e in impl.encode_batch(list(texts))]
        max_length = max(8, math.ceil(float(np.percentile(counts, 99)) / 8) * 8) if counts else 8
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

"""Text as hashed token ids (the "hashing trick"): the id inputs an embedding model reads.

A text becomes lower-case word tokens (``tokenize``), optionally with its 2..n-grams
(``ngrams``); each token goes to one of 2**bits buckets by a stable 64-bit hash (``hash_tokens``:
BLAKE2b, so the same token gets the same id on every machine and in every process, whatever
PYTHONHASHSEED says); ``encode`` stacks the examples into an int64 (n, L) array padded with -1.
A token that occurs twice in a text appears twice; two tokens may share a bucket (a collision),
which is the price of a fixed vocabulary-free table.

Reading labelled text files (one ``label<TAB>text`` a line, or a table's text column) is
``ps.worker.data.read_text``'s, beside the other readers whose table code it shares; this
module reads no files, so the readers can import it without a cycle.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

from ps.spec import TEXT_DEFAULTS, TEXT_RANGES
from ps.worker.dataset import Dataset

#: a token: letters and digits (any script), with apostrophes inside a word kept ("don't")
TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
#: one example a line in the lines layout: label, TAB, text
SEPARATOR = "\t"


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of ``text``: maximal runs of letters and digits (Unicode, so
    "Café" gives "café"), joined across inner apostrophes ("Don't" gives "don't"); punctuation,
    underscores, quotes and white space separate tokens and are dropped. The typographic
    apostrophe (U+2019) counts as "'"."""
    return TOKEN.findall(text.replace("\u2019", "'").lower())


def ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """The 1..n-grams of ``tokens``, each joined by one space, ordered by start position and then
    by length: ``ngrams(["a", "b", "c"], 2) == ["a", "a b", "b", "b c", "c"]``. So cutting the
    list at max_tokens keeps a prefix of the text with all of its n-grams."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ngrams: n must be an integer >= 1, got {n!r}")
    tokens = list(tokens)
    if n == 1:
        return tokens
    out = []
    for i in range(len(tokens)):
        for k in range(1, min(n, len(tokens) - i) + 1):
            out.append(" ".join(tokens[i:i + k]))
    return out


def token_hash(token: str) -> int:
    """A token's stable 64-bit hash: the first 8 bytes of BLAKE2b-64 of its UTF-8, read
    little-endian as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def hash_tokens(tokens: Iterable[str], bits: int) -> np.ndarray:
    """Each token's bucket, ``token_hash(token) mod 2**bits``, as int64 (one per token, in order;
    bits in [1, 30])."""
    _check("hash_bits", bits)
    tokens = tokens if isinstance(tokens, list) else list(tokens)
    mask = (1 << bits) - 1
    bucket = {t: token_hash(t) & mask for t in dict.fromkeys(tokens)}  # each distinct token hashed once
    return np.fromiter(map(bucket.__getitem__, tokens), dtype=np.int64, count=len(tokens))


def encode(texts: Iterable[str], bits: int = TEXT_DEFAULTS["hash_bits"], ngram: int = TEXT_DEFAULTS["ngrams"],
           max_tokens: int = TEXT_DEFAULTS["max_tokens"]) -> np.ndarray:
    """Hashed ids of ``texts`` as int64 (n, L): row i holds the buckets of the first max_tokens
    of ``ngrams(tokenize(texts[i]), ngram)``, then -1 padding; L = min(max_tokens, the longest
    row), at least 1 (a text without tokens is a row of -1)."""
    _check("hash_bits", bits)
    _check("ngrams", ngram)
    _check("max_tokens", max_tokens)
    grams = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"encode: example {len(grams)} is {type(text).__name__}, expected a string")
        # A prefix of max_tokens + ngram - 1 tokens gives the same first max_tokens n-grams.
        grams.append(ngrams(tokenize(text)[:max_tokens + ngram - 1], ngram)[:max_tokens])
    lengths = np.fromiter((len(g) for g in grams), dtype=np.int64, count=len(grams))
    width = max(1, int(lengths.max(initial=0)))
    out = np.full((len(grams), width), -1, dtype=np.int64)
    # Row-major boolean assignment fills each row's first `length` slots, in order.
    out[np.arange(width) < lengths[:, None]] = hash_tokens([g for row in grams for g in row], bits)
    return out


def _check(key: str, value) -> None:
    lo, hi = TEXT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")


def parse_lines(text: str, where: str) -> tuple[list[str], list[str], list[int]]:
    """The lines layout: (labels, texts, line numbers) of ``text``, one example a line as
    ``label<TAB>text`` (the text may hold further TABs; blank lines are skipped). A line without
    a TAB or with an empty label raises ValueError naming ``where`` and the line number."""
    labels, texts, lines = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, body = line.partition(SEPARATOR)
        if not sep:
            raise ValueError(f"{where} line {lineno}: expected 'label<TAB>text', found no TAB")
        label = label.strip()
        if not label:
            raise ValueError(f"{where} line {lineno}: empty label before the TAB")
        labels.append(label)
        texts.append(body)
        lines.append(lineno)
    if not labels:
        raise ValueError(f"{where}: no examples (expected lines of 'label<TAB>text')")
    return labels, texts, lines


def text_dataset(texts: Sequence[str], y: np.ndarray, classes: list[str] | None, options: dict) -> Dataset:
    """A Dataset of hashed ids from texts and their labels, with spec.data.text ``options``."""
    x = encode(texts, bits=options["hash_bits"], ngram=options["ngrams"], max_tokens=options["max_tokens"])
    return Dataset(x, y, None, classes)

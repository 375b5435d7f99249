"""Built-in data: ``builtin:digits`` (scikit-learn's 8x8 handwritten digits) and
``builtin:fortunes`` (English fortune-cookie texts labelled with their topic), both shipped
with the package, and the ``synthetic:classification`` / ``synthetic:regression`` /
``synthetic:ctr`` generators for large-scale tests.

``builtin:fortunes`` holds 4,559 fortunes of 10 topics (computers 1050, food 197, law 202,
love 150, politics 700, science 623, songs-poems 716, sports 147, startrek 227, zippy 547), from
ten data files of Debian's ``fortunes`` package 1:1.99.1-7.3 (fortune-mod 1.99.1, BSD
fortune(6)'s data), under fortune-mod's BSD license: ``data/FORTUNES_LICENSE.txt`` says which
files and how they were cleaned. It reads as hashed token ids (ps.worker.text), with the job
spec's ``data.text`` options (ngrams, hash_bits, max_tokens; ``column`` does not apply).

``synthetic:classification?n=100000&features=20&classes=2&noise=0&seed=0`` draws x ~ N(0, I)
and labels each row with a random linear teacher, ``y = argmax(x @ W + b)``, so the classes are
linearly separable and a linear model can reach 100% (``noise`` is the fraction of labels
replaced by a random class). ``synthetic:regression?n=...&features=...&noise=0.1&seed=0`` draws
x ~ N(0, I) and ``y = x @ w + b + noise * N(0, 1)`` with ``w ~ N(0, 1/features)``.
``synthetic:ctr?n=10000&fields=8&ids=100000&seed=0`` is click-through-like data for embedding
models: x int64 (n, fields) categorical ids, y int64 clicks 0/1 (see ``ctr``).
The same query gives the same arrays on every machine.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from urllib.parse import parse_qsl

import numpy as np

from ps.spec import text_options
from ps.worker.dataset import Dataset
from ps.worker.text import parse_lines, text_dataset

BUILTINS = ("digits", "fortunes")
GENERATORS = ("classification", "regression", "ctr")


def load_builtin(name: str, image: bool = False, text: dict | None = None) -> Dataset:
    """A built-in dataset; ``digits`` gives x float32 (1797, 64) pixels 0..16, or (1797, 1, 8, 8)
    with ``image=True``, and y int64 digits 0..9; ``fortunes`` gives x int64 (4559, L) hashed
    token ids padded with -1 (``ps.worker.text.encode`` with the spec.data.text options
    ``text``, defaults ps.spec.TEXT_DEFAULTS), y int64 topic ids indexing ``classes``."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset '{name}' (available: {', '.join(BUILTINS)})")
    if name == "fortunes":
        if image:
            raise ValueError("builtin:fortunes: texts are not images (image=1 applies to builtin:digits)")
        options = text_options(text, "data.text")
        if options["column"] is not None:
            raise ValueError("data.text.column: builtin:fortunes has no columns to choose from; leave it out")
        texts, y, classes = fortunes()
        return text_dataset(texts, y.copy(), list(classes), options)
    if text is not None:
        raise ValueError(f"data.text: builtin:{name} is not text; text options apply to text data")
    x, y = _digits()
    x = x.astype(np.float32)
    if image:
        x = x.reshape(len(x), 1, 8, 8)
    return Dataset(x, y.astype(np.int64), None if image else [f"pixel_{r}_{c}" for r in range(8) for c in range(8)])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("ps.worker") / "data" / "digits.npz"
    with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def fortunes() -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """builtin:fortunes as text: (texts, y int64 topic ids, topic names sorted), read once."""
    ref = resources.files("ps.worker") / "data" / "fortunes.tsv.gz"
    body = gzip.decompress(ref.read_bytes()).decode("utf-8")
    labels, texts, _ = parse_lines(body, "builtin:fortunes")
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[c] for c in labels], dtype=np.int64)
    y.setflags(write=False)
    return tuple(texts), y, tuple(classes)


def synthetic(kind: str, n: int = 10_000, features: int = 20, classes: int = 2, noise: float | None = None,
              seed: int = 0) -> Dataset:
    """Deterministic generated data; see the module docstring for the models behind each kind
    (``ctr`` has parameters of its own: ``ctr``)."""
    if kind == "ctr":
        raise ValueError("synthetic:ctr takes n, fields, ids and seed: call ctr(), not synthetic('ctr')")
    if kind not in GENERATORS:
        raise ValueError(f"unknown synthetic generator '{kind}' (available: {', '.join(GENERATORS)})")
    if n < 1 or features < 1:
        raise ValueError(f"synthetic:{kind}: n and features must be at least 1, got n={n}, features={features}")
    from ps.errors import PSError
    from ps.limits import current
    try:  # before anything is drawn: n x features values are allocated at once
        current().check_synthetic(f"synthetic:{kind}", n, features, classes if kind == "classification" else None)
    except PSError as e:
        raise ValueError(str(e)) from None
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features), dtype=np.float32)
    names = [f"x{i}" for i in range(features)]
    if kind == "classification":
        if classes < 2:
            raise ValueError(f"synthetic:classification: classes must be at least 2, got {classes}")
        noise = 0.0 if noise is None else noise
        if not 0 <= noise <= 1:
            raise ValueError(f"synthetic:classification: noise is a fraction of flipped labels in [0, 1], got {noise}")
        w = rng.standard_normal((features, classes)).astype(np.float32)
        b = (0.1 * rng.standard_normal(classes)).astype(np.float32)
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        flip = rng.random(n) < noise
        y[flip] = rng.integers(0, classes, int(flip.sum()))
        return Dataset(x, y, names)
    noise = 0.1 if noise is None else noise
    if noise < 0:
        raise ValueError(f"synthetic:regression: noise must be >= 0, got {noise}")
    w = (rng.standard_normal(features) / np.sqrt(features)).astype(np.float32)
    b = np.float32(rng.standard_normal())
    y = (x @ w + b + noise * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    return Dataset(x, y, names)


#: ctr's Zipf exponent: the id of popularity rank r (0 the most drawn) has probability ~ 1/(r+1)
CTR_ZIPF = 1.0
#: ctr's teacher: logit = CTR_BIAS + the sum of the example's id weights, w ~ N(0, CTR_SCALE**2 / fields)
CTR_BIAS = -1.6
CTR_SCALE = 2.0
_CTR_BLOCK = 1 << 20  # values drawn per block of rows: bounds the temporaries besides x


def ctr(n: int = 10_000, fields: int = 8, ids: int = 100_000, seed: int = 0) -> Dataset:
    """Click-through-like data: x int64 (n, fields), y int64 clicks 0/1 (``synthetic:ctr``).

    The ``ids`` distinct ids are split into ``fields`` consecutive ranges, field f owning
    ``ids // fields`` of them (one more for the first ``ids % fields`` fields), so no two fields
    share an id. Column f draws from its range with a Zipf law (exponent CTR_ZIPF) over a
    random popularity order: a few ids are frequent, most are rare or never drawn. A hidden
    logistic teacher gives each id a weight w ~ N(0, CTR_SCALE**2 / fields) and clicks with
    probability sigmoid(CTR_BIAS + sum of the row's weights): a quarter to a third of rows
    click, and a model that learns per-id weights (an embedding, a sparse logistic regression)
    beats that base rate. ``n`` x ``fields`` and ``ids`` are bounded by ps.limits
    (max_synthetic_values).
    """
    for key, value, low in (("n", n, 1), ("fields", fields, 1), ("ids", ids, fields)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            floor = "the number of fields" if key == "ids" else "1"
            raise ValueError(f"synthetic:ctr: {key} must be an integer of at least {floor}, got {value!r}")
    from ps.errors import PSError
    from ps.limits import current
    try:  # before anything is drawn
        current().check_synthetic("synthetic:ctr", n, fields, ids=ids, width="fields")
    except PSError as e:
        raise ValueError(str(e)) from None
    n, fields, ids = int(n), int(fields), int(ids)
    rng = np.random.default_rng(seed)
    sizes = np.full(fields, ids // fields, dtype=np.int64)
    sizes[:ids % fields] += 1  # so the sizes take at most two values, longer fields first
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # id_of[offsets[f] + r]: field f's id of popularity rank r, a random order of its range
    groups = [(int(size), np.flatnonzero(sizes == size)) for size in np.unique(sizes)[::-1]]
    id_of = np.concatenate([(offsets[cols, None] + rng.permuted(
        np.broadcast_to(np.arange(size), (len(cols), size)), axis=1)).reshape(-1) for size, cols in groups])
    # cumsum adds in order and 1/k rounds exactly: the same CDF, bit for bit, on every machine
    cdfs = [np.cumsum(1.0 / np.arange(1, size + 1, dtype=np.float64) ** CTR_ZIPF) for size, _ in groups]
    x = np.empty((n, fields), dtype=np.int64)
    step = max(1, _CTR_BLOCK // fields)
    for start in range(0, n, step):  # consecutive blocks draw what one rng.random((n, fields)) would
        u = rng.random((min(step, n - start), fields))
        for (size, cols), cdf in zip(groups, cdfs):
            rank = np.searchsorted(cdf, u[:, cols] * cdf[-1], side="right")
            x[start:start + len(u), cols] = id_of[offsets[cols] + np.minimum(rank, size - 1)]
    w = rng.standard_normal(ids) * (CTR_SCALE / np.sqrt(fields))
    logit = np.empty(n)
    for start in range(0, n, step):
        logit[start:start + step] = w[x[start:start + step]].sum(axis=1)
    y = (CTR_BIAS + logit + rng.logistic(size=n) > 0).astype(np.int64)  # Bernoulli(sigmoid(logit))
    return Dataset(x, y, [f"field{f}" for f in range(fields)])


_PARAMS = {"n": int, "features": int, "classes": int, "noise": float, "seed": int}
_CTR_PARAMS = {"n": int, "fields": int, "ids": int, "seed": int}


def open_uri(uri: str, text: dict | None = None) -> Dataset:
    """Dispatch ``builtin:NAME[?image=1]`` and ``synthetic:KIND?key=value&...`` URIs; ``text``:
    spec.data.text options for a text built-in (builtin:fortunes)."""
    scheme, _, rest = uri.partition(":")
    name, _, query = rest.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{uri}: could not parse the query '{query}' (expected key=value&key=value)") from None
    if scheme == "builtin":
        opts = dict(pairs)
        bad = sorted(set(opts) - {"image"})
        if bad:
            raise ValueError(f"{uri}: unknown parameter '{bad[0]}' (known: image)")
        image = opts.get("image", "0").lower() in ("1", "true", "yes")
        return load_builtin(name, image=image, text=text)
    if text is not None:
        raise ValueError(f"data.text: {uri} is not text; text options apply to text data")
    params = _CTR_PARAMS if name == "ctr" else _PARAMS
    kwargs = {}
    for key, value in pairs:
        if key not in params:
            raise ValueError(f"{uri}: unknown parameter '{key}' (known: {', '.join(params)})")
        try:
            kwargs[key] = params[key](float(value)) if params[key] is int and "e" in value.lower() \
                else params[key](value)
        except (ValueError, OverflowError):  # int(float("1e400")) overflows
            raise ValueError(f"{uri}: parameter '{key}' must be a number, got '{value}'") from None
    return ctr(**kwargs) if name == "ctr" else synthetic(name, **kwargs)

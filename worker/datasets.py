"""Built-in data: ``builtin:digits`` (scikit-learn's 8x8 handwritten digits, shipped with the
package) and the ``synthetic:classification`` / ``synthetic:regression`` generators for
large-scale tests.

``synthetic:classification?n=100000&features=20&classes=2&noise=0&seed=0`` draws x ~ N(0, I)
and labels each row with a random linear teacher, ``y = argmax(x @ W + b)``, so the classes are
linearly separable and a linear model can reach 100% (``noise`` is the fraction of labels
replaced by a random class). ``synthetic:regression?n=...&features=...&noise=0.1&seed=0`` draws
x ~ N(0, I) and ``y = x @ w + b + noise * N(0, 1)`` with ``w ~ N(0, 1/features)``.
The same query gives the same arrays on every machine.
"""

from __future__ import annotations

import functools
from importlib import resources
from urllib.parse import parse_qsl

import numpy as np

from ps.worker.dataset import Dataset

BUILTINS = ("digits",)
GENERATORS = ("classification", "regression")


def load_builtin(name: str, image: bool = False) -> Dataset:
    """A built-in dataset; ``digits`` gives x float32 (1797, 64) pixels 0..16, or (1797, 1, 8, 8)
    with ``image=True``, and y int64 digits 0..9."""
    if name != "digits":
        raise ValueError(f"unknown built-in dataset '{name}' (available: {', '.join(BUILTINS)})")
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


def synthetic(kind: str, n: int = 10_000, features: int = 20, classes: int = 2, noise: float | None = None,
              seed: int = 0) -> Dataset:
    """Deterministic generated data; see the module docstring for the models behind each kind."""
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


_PARAMS = {"n": int, "features": int, "classes": int, "noise": float, "seed": int}


def open_uri(uri: str) -> Dataset:
    """Dispatch ``builtin:NAME[?image=1]`` and ``synthetic:KIND?key=value&...`` URIs."""
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
        return load_builtin(name, image=image)
    kwargs = {}
    for key, value in pairs:
        if key not in _PARAMS:
            raise ValueError(f"{uri}: unknown parameter '{key}' (known: {', '.join(_PARAMS)})")
        try:
            kwargs[key] = _PARAMS[key](float(value)) if _PARAMS[key] is int and "e" in value.lower() \
                else _PARAMS[key](value)
        except (ValueError, OverflowError):  # int(float("1e400")) overflows
            raise ValueError(f"{uri}: parameter '{key}' must be a number, got '{value}'") from None
    return synthetic(name, **kwargs)

"""The built-in demo jobs: an MLP and a small CNN on the bundled 8x8 digits, and a hashed-feature
softmax regression (``sparse_linear``: one sparse-table row per hash bucket) on the bundled fortunes
texts (10 topics), each on a 7:3 split."""

from __future__ import annotations

from ps.spec import DataSpec, JobSpec

MODELS = ("mlp", "cnn", "text")


def demo_spec(model: str = "mlp", epochs: int | None = None, seed: int = 0, workers: int = 2,
              lease_timeout_s: float = 30.0) -> JobSpec:
    """The demo job for ``model`` ('mlp', 'cnn' or 'text')."""
    optimizer = {"name": "adam", "lr": 0.002}
    if model == "mlp":
        layers = [{"type": "dense", "units": 128, "activation": "relu"},
                  {"type": "dense", "units": 10}]
        data = DataSpec(uri="builtin:digits", test_fraction=0.3, scale="standard")
        default_epochs = 20
    elif model == "cnn":
        layers = [{"type": "conv2d", "filters": 16, "kernel": 3, "padding": "same"}, {"type": "relu"},
                  {"type": "maxpool2d", "size": 2},
                  {"type": "conv2d", "filters": 32, "kernel": 3, "padding": "same"}, {"type": "relu"},
                  {"type": "flatten"},
                  {"type": "dense", "units": 64, "activation": "relu"},
                  {"type": "dense", "units": 10}]
        data = DataSpec(uri="builtin:digits", reshape=[1, 8, 8], test_fraction=0.3, scale="minmax")
        default_epochs = 30
    elif model == "text":
        layers = [{"type": "sparse_linear", "units": 10}]
        data = DataSpec(uri="builtin:fortunes", test_fraction=0.3, scale="none",
                        text={"hash_bits": 18, "ngrams": 1, "max_tokens": 256})
        optimizer = {"name": "adagrad", "lr": 0.2}
        default_epochs = 10
    else:
        raise ValueError(f"unknown demo model '{model}': expected one of {', '.join(MODELS)}")
    return JobSpec(name=f"{'fortunes' if model == 'text' else 'digits'}-{model}", model=layers, data=data,
                   loss="softmax_cross_entropy", optimizer=optimizer, batch_size=32,
                   epochs=epochs or default_epochs, workers=workers, seed=seed, lease_timeout_s=lease_timeout_s)

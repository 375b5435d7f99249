"""The built-in demo jobs: an MLP and a small CNN on the bundled 8x8 digits (7:3 split)."""

from __future__ import annotations

from ps.spec import DataSpec, JobSpec


def demo_spec(model: str = "mlp", epochs: int | None = None, seed: int = 0, workers: int = 2,
              lease_timeout_s: float = 30.0) -> JobSpec:
    """The demo job for ``model`` ('mlp' or 'cnn')."""
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
    else:
        raise ValueError(f"unknown demo model '{model}': expected mlp or cnn")
    return JobSpec(name=f"digits-{model}", model=layers, data=data, loss="softmax_cross_entropy",
                   optimizer={"name": "adam", "lr": 0.002}, batch_size=32, epochs=epochs or default_epochs,
                   workers=workers, seed=seed, lease_timeout_s=lease_timeout_s)

"""The single-process NumPy training loop (no servers): the baseline that cluster training is
compared with, for accuracy (tests) and for speed (`paramserver bench train`)."""

from __future__ import annotations

import time

import numpy as np

from ps.spec import JobSpec
from ps.worker.inspect import build_model, load_data, prepare


def train_local(spec: JobSpec, epochs: int | None = None) -> dict:
    """Train ``spec`` in this process with the same model, optimizer, data split and scaling as a
    job; return test accuracy/loss, samples and samples/s of the training steps."""
    from ps.server.optimizers import make_optimizer
    from ps.trained import scale
    from ps.worker.losses import LOSSES
    from ps.worker.preprocess import batches, one_hot, train_test_split
    prep = prepare(spec)
    ds = load_data(spec)
    model = build_model(spec, tuple(prep["input_shape"]))
    train_idx, test_idx = train_test_split(len(ds.x), spec.data.test_fraction, spec.seed)
    x = scale(prep, ds.x)
    y = ds.y.astype(np.int64) if spec.loss == "softmax_cross_entropy" else ds.y.astype(np.float32)
    if spec.loss != "softmax_cross_entropy" and spec.data.one_hot:
        y = one_hot(ds.y.astype(np.int64), int(np.prod(prep["output_shape"]))).astype(np.float32)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    params = model.init_params(spec.seed)
    opt = make_optimizer(dict(spec.optimizer))
    state = {k: opt.init_state(v.size, v.dtype) for k, v in params.items()}
    step, samples, busy = 0, 0, 0.0
    for epoch in range(epochs or spec.epochs):
        for i, idx in enumerate(batches(len(x_train), spec.batch_size, spec.seed, epoch)):
            t0 = time.perf_counter()
            _, grads, _ = model.loss_and_grads(np, params, x_train[idx], y_train[idx], spec.loss, train=True,
                                               rng_seed=spec.seed + 7919 * (epoch + 1) + i)
            step += 1
            for k, g in grads.items():
                opt.apply(params[k].reshape(-1), np.ascontiguousarray(g).reshape(-1), state[k], step)
            busy += time.perf_counter() - t0
            samples += len(idx)
    out = model.forward(np, params, x_test, train=False)
    loss, _, correct = LOSSES[spec.loss](np, out, y_test)
    return {"test_accuracy": (correct / len(x_test)) if correct is not None else float("nan"),
            "test_loss": float(loss), "samples": samples, "seconds": busy,
            "samples_per_s": samples / busy if busy else 0.0, "params": params}

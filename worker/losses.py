"""Losses: ``(xp, output, target) -> (mean loss as a float, grad wrt output, n_correct or None)``.

With ``lazy=True`` on CuPy a loss leaves its figures on the device: the first item is then a float64
pair [mean loss, n_correct (NaN for MSE)] and the third None, so a training step synchronises with
the host once, when that pair comes back with the gradients (``kernels.loss_stats``).
"""

from __future__ import annotations

import math

from ps.worker import kernels
from ps.worker.xp import is_cupy


def softmax_cross_entropy(xp, output, target, lazy: bool = False):
    """Mean cross-entropy of softmax(output) (N, C) against integer class ids (N,); n_correct by argmax."""
    return kernels.softmax_xent(xp, output, target, lazy)


def binary_cross_entropy(xp, output, target, lazy: bool = False):
    """Mean binary cross-entropy of sigmoid(output) (N, 1) or (N,) against 0/1 targets; n_correct at logit 0."""
    return kernels.bce_logits(xp, output, target, lazy)


def mse(xp, output, target, lazy: bool = False):
    """Mean over all elements of (output - target)^2; targets of shape (N,) fit outputs of shape (N, 1)."""
    target = target.reshape(output.shape).astype(output.dtype, copy=False)
    diff = output - target
    size = max(output.size, 1)
    total = (diff * diff).sum()
    grad = diff * output.dtype.type(2.0 / size)
    if lazy and is_cupy(xp):  # the same device pair as the other losses', with no count
        return kernels.loss_stats(xp, total, xp.asarray(float("nan")), size, lazy=True)[0], grad, None
    return float(total) / size, grad, None


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "mse": mse}


def get_loss(name: str):
    """The loss function called ``name``; ValueError naming it when there is none."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}") from None


def validate_loss_for_output(loss: str, output_shape: tuple[int, ...]) -> None:
    """ValueError when a model with ``output_shape`` (no batch axis) cannot be trained with ``loss``."""
    get_loss(loss)
    units = math.prod(output_shape)
    if loss == "softmax_cross_entropy" and (len(output_shape) != 1 or units < 2):
        raise ValueError(f"softmax_cross_entropy needs a flat output of at least 2 classes, the model's output "
                         f"shape is {tuple(output_shape)}")
    if loss == "binary_cross_entropy" and units != 1:
        raise ValueError(f"binary_cross_entropy needs 1 output, the model's output shape is {tuple(output_shape)} "
                         f"({units} outputs)")

"""Stateless workers: the training loop, models, kernels, data readers."""

"""paramserver: sharded parameter servers, server-side optimizers, stateless workers over gRPC."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Names are imported on first use, so `import ps.sharding` (or the CLI) loads only what it needs.
_EXPORTS = {
    "Client": "ps.client", "Model": "ps.client", "LocalCluster": "ps.local", "Init": "ps.initializers",
    "PSError": "ps.errors", "InvalidArgument": "ps.errors", "NotFound": "ps.errors",
    "AlreadyExists": "ps.errors", "FailedPrecondition": "ps.errors", "Unavailable": "ps.errors",
    "Job": "ps.client", "JobFailed": "ps.client", "JobCancelled": "ps.client",
    "JobSpec": "ps.spec", "DataSpec": "ps.spec", "SpecError": "ps.spec",
    "TrainedModel": "ps.trained", "load_model": "ps.trained", "TLS": "ps.security", "SparseTable": "ps.sparse",
    "PermissionDenied": "ps.errors", "Unauthenticated": "ps.errors", "ResourceExhausted": "ps.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ps' has no attribute '{name}'")

"""paramserver: sharded parameter servers, server-side optimizers, stateless workers over gRPC."""

__version__ = "0.1.0"

"""Parameter-server shards: tables, optimizers, the gRPC service."""

"""The scheduler: cluster membership, shard maps, jobs and task leases."""

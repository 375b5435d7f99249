"""The peer a user would otherwise pick, in our own benchmark: a minimal parameter server on
torch.distributed.rpc (TensorPipe), with the model cut in as many shards as ours, each shard a
server process (rank 0..S-1) that applies SGD in place and returns its fresh weights; the bench
process joins as the client (rank S). Server processes get the same malloc settings as ours.

Needs torch (CPU is enough): ``pip install -e '.[bench]'`` or any torch wheel.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

#: the shard this server process holds (set by ``serve``)
_WEIGHTS = None


def _push_pull(grad, lr: float):
    """Runs on a server: SGD in place, the fresh weights back."""
    _WEIGHTS.sub_(grad, alpha=lr)
    return _WEIGHTS


def serve(rank: int, world: int, port: int, n: int) -> None:
    import torch
    import torch.distributed.rpc as rpc

    import ps.bench_torch_rpc as this  # run as __main__, the calls resolve _push_pull in the module proper
    this._WEIGHTS = torch.zeros(n, dtype=torch.float32)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rpc.init_rpc(f"server{rank}", rank=rank, world_size=world,
                 rpc_backend_options=rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=600))
    rpc.shutdown()  # waits for every rank, the client included, to finish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchRpcPS:
    """S torch RPC server processes and this process as their client, for ``with``."""

    def __init__(self, size: int, servers: int):
        import torch  # noqa: F401 - fail here, with the install hint, when it is missing
        self.n = size // 4
        self.servers = servers
        self.world = servers + 1
        self.port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
        per = -(-self.n // servers)
        self.sizes = [min(per, self.n - i * per) for i in range(servers)]
        self.procs = [subprocess.Popen([sys.executable, "-m", "ps.bench_torch_rpc", str(r), str(self.world),
                                        str(self.port), str(self.sizes[r])], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                      for r in range(servers)]

    def __enter__(self) -> "TorchRpcPS":
        import torch.distributed.rpc as rpc
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port))
        rpc.init_rpc("client", rank=self.servers, world_size=self.world,
                     rpc_backend_options=rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=600))
        return self

    def push_pull(self, grad, lr: float = 1e-4):
        """Each shard of ``grad`` (a float32 torch tensor) to its server, the fresh weights back."""
        import torch.distributed.rpc as rpc
        futs, start = [], 0
        for r, k in enumerate(self.sizes):
            futs.append(rpc.rpc_async(f"server{r}", _push_pull, args=(grad[start:start + k], lr)))
            start += k
        return [f.wait() for f in futs]

    def __exit__(self, *exc) -> None:
        import torch.distributed.rpc as rpc
        rpc.shutdown()
        deadline = time.monotonic() + 30
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

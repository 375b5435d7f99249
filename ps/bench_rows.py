"""`paramserver bench rows`: sparse-table throughput (pull_rows then push_rows of one batch of
ids, per table width and batch size) against raw grpcio moving the same bytes per round trip to
as many server processes, measured in the same run (ps.bench.EchoCeiling)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable

import numpy as np

from ps.bench import ROUNDS, EchoCeiling, _timed

#: ids are drawn from [0, ID_SPACE)
ID_SPACE = 10_000_000
#: share of a batch's positions that repeat an id already in it, as a real batch's popular ids do
REPEATS = 0.1
MODEL = "bench-rows"
#: every gradient value; the value does not change the cost, and a constant lets a test recount
#: each row's updates exactly (sgd, lr 1, zero rows: a row reads -(times its id was pushed))
GRAD = 1.0


def batch_ids(batch: int, round_: int, seed: int = 0) -> np.ndarray:
    """The ids of one round: uniform over [0, ID_SPACE), with REPEATS of the positions taken by
    ids already in the batch, shuffled. Pure: a function of (batch, round_, seed) alone."""
    rng = np.random.default_rng((seed, batch, round_))
    fresh = rng.integers(0, ID_SPACE, batch - int(batch * REPEATS), dtype=np.int64)
    ids = np.concatenate([fresh, rng.choice(fresh, batch - len(fresh))])
    rng.shuffle(ids)
    return ids


def table_name(width: int) -> str:
    """The bench model's table of rows of ``width``."""
    return f"emb{width}"


def round_bytes(batch: int, width: int, itemsize: int = 4) -> int:
    """Payload bytes of one round (pull then push): the ids twice, the rows pulled, the gradients pushed."""
    return 2 * batch * (8 + width * itemsize)


def _ceiling(batch: int, width: int, servers: int, chunk_bytes: int) -> EchoCeiling:
    """Raw grpcio echo of a round's bytes: per server two messages each way (a pull and a push
    each move their share once), or chunk_bytes messages when a round needs more, as ours do."""
    size = round_bytes(batch, width) // 2  # echoed: sent and received
    chunk = min(chunk_bytes, math.ceil(size / servers / 2))
    return EchoCeiling(size, servers, chunk)


def rows(widths=(16, 64), batches=(1_000, 10_000, 100_000), servers: int = 2, seconds: float = 1.5,
         as_json: bool = False, optimizer: str | dict = "adagrad", seed: int = 0, cluster=None,
         echo: Callable[[str], None] = print) -> dict:
    """`paramserver bench rows`: rows/s and GB/s of pull_rows + push_rows per (width, batch) on a
    model with one table per width, and the ratio to raw grpcio moving the same bytes; ``seconds``
    per measurement, each split over ROUNDS alternations (best of each). ``cluster``: a running
    ps.LocalCluster to use (the model is left on it), else one with ``servers`` servers is started.
    Returns the figures; with ``as_json`` also echoes them as one JSON object, last."""
    from ps.local import LocalCluster
    from ps.sparse import SparseTable
    if isinstance(optimizer, str):
        optimizer = {"name": optimizer, "lr": 0.01}
    widths, batches, cases = list(dict.fromkeys(widths)), list(dict.fromkeys(batches)), []
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(LocalCluster(servers=servers))
        client = stack.enter_context(cluster.client())
        model = client.create_model(MODEL, {table_name(w): SparseTable(w) for w in widths}, optimizer=optimizer,
                                    replace=True)
        servers = len(model.shards)
        echo(f"{servers} servers, optimizer {optimizer['name']}; ids uniform over {ID_SPACE:,} with "
             f"{REPEATS:.0%} repeats per batch; pull_rows then push_rows, {seconds:g} s per measurement")
        for width in widths:
            for batch in batches:
                case = _case(model, width, batch, seconds, seed, servers)
                cases.append(case)
                echo(f"width {width:3d}, batch {batch:>7,}: {case['rows_per_s']:>11,} rows/s, {case['gbps']:6.3f} "
                     f"GB/s ({case['ms_per_round']:.1f} ms per pull + push); raw grpcio {case['grpc_gbps']:6.3f} "
                     f"GB/s; ratio {case['vs_grpc']:.3f}")
    result = {"cases": cases, "servers": servers, "seconds": seconds, "optimizer": optimizer["name"],
              "id_space": ID_SPACE, "repeats": REPEATS, "seed": seed}
    if as_json:
        echo(json.dumps(result, sort_keys=True))
    return result


def _case(model, width: int, batch: int, seconds: float, seed: int, servers: int) -> dict:
    """One (width, batch): ours and the raw grpcio echo, alternated ROUNDS times, best of each."""
    table = table_name(width)
    grads = np.full((batch, width), GRAD, np.float32)
    done = {"rounds": 0, "messages": 0}

    def one_round() -> float:
        """Seconds spent in pull_rows and push_rows (drawing the ids is not timed)."""
        ids = batch_ids(batch, done["rounds"], seed)
        t = time.perf_counter()
        model.pull_rows(table, ids)
        done["messages"] += model.push_rows(table, ids, grads)
        spent = time.perf_counter() - t
        done["rounds"] += 1
        return spent

    def per_round(budget: float) -> float:
        """Seconds per round, over at least ``budget`` seconds and 2 rounds."""
        n, spent = 0, 0.0
        while n < 2 or spent < budget:
            spent += one_round()
            n += 1
        return spent / n

    ours = echo = float("inf")
    with _ceiling(batch, width, servers, model.client.chunk_bytes) as ceiling:
        one_round()  # warm-up: the first round of a case grows the table
        for _ in range(ROUNDS):
            ours = min(ours, per_round(seconds / ROUNDS))
            echo = min(echo, _timed(ceiling.once, seconds / ROUNDS))
        echo_bytes = ceiling.bytes_per_call
    gbps = round_bytes(batch, width) / ours / 1e9
    grpc_gbps = echo_bytes / echo / 1e9
    return {"width": width, "batch": batch, "rows_per_s": round(2 * batch / ours), "gbps": round(gbps, 4),
            "grpc_gbps": round(grpc_gbps, 4), "vs_grpc": round(gbps / grpc_gbps, 4),
            "ms_per_round": round(ours * 1e3, 3), "pushes": done["rounds"], "push_messages": done["messages"]}

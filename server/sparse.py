"""Sparse tables: the embedding rows a shard keeps for int64 ids, and their per-row optimizers.

A table (ps-lite's KV pairs, Angel's and Paddle's sparse tables) holds one row of ``width``
values per admitted id, that row's optimizer state, update count and last-touched step:

    table = SparseTable(TableSpec("emb", 16, init=RowInit("normal", seed=7, std=0.01)), {"name": "adam"})
    rows = table.pull(np.array([3, 9, 3], np.int64))                 # (3, 16), repeats allowed
    table.push(ids, grads, client_id="w0", seq=1)                    # True; the same again: False

- A row starts as ``initial_rows(spec.init, id)``: a function of (seed, id) alone, so every
  server and process makes the same row for an id, whatever batch asked for it.
- Admission (``admit_after`` = k): with k <= 1 a row is stored the first time its id is pulled or
  pushed. With k >= 2 only pushes count: each push that carries an id is one sighting of it
  (however often the id repeats in that push); the pushes before the k-th are dropped for that
  id, and the k-th creates the row from its initial value and applies that push's gradient.
  A pull of an id not stored returns its initial row and stores (and counts) nothing.
- Steps: the table's clock counts the pushes applied. A push touches its rows at the new step,
  a pull at the current one; ``evict()`` drops rows (and pending sightings) not touched for
  ``evict_after`` steps (0: never). A re-pulled evicted id starts again from its initial row.
- Exactly once: a push whose seq is not above the highest applied for its client_id is a
  duplicate; it changes nothing and returns False.
- Every request is validated whole before anything changes, so a rejected one (InvalidArgument)
  leaves the table exactly as it was. One lock per table serialises pulls, pushes and evictions.

Pure NumPy, no gRPC: a servicer decodes requests and hands the arrays here.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping

import numpy as np

from ps.errors import InvalidArgument
from ps.optimizer_config import OptimizerConfig
from ps.sharding import SPLITMIX64_GAMMA, mix64, splitmix64
# the table's spec is plain data clients and the scheduler share: it lives in ps.sparse
from ps.server.id_index import IdIndex
from ps.sparse import DTYPES, MAX_WIDTH, ROW_INIT_KINDS, RowInit, TableSpec, _integer, _number  # noqa: F401

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
SNAPSHOT_FORMAT = 1

# Hyper-parameters each sparse optimizer reads. sgd/adagrad/adam take OptimizerConfig's names and
# defaults (torch's). ftrl, which OptimizerConfig does not know, takes the paper's (McMahan et al.
# 2013) beta, lambda1 (l1) and lambda2 (l2), with its advice beta = 1; its learning rate alpha is
# "lr", as everywhere else here ("alpha" is accepted too, but OptimizerConfig's alpha is RMSprop's
# smoothing constant, so configs and snapshots spell it lr).
_HYPER = {"sgd": ("lr",), "adagrad": ("lr", "eps", "initial_accumulator_value", "lr_decay"),
          "adam": ("lr", "beta1", "beta2", "eps"), "ftrl": ("lr", "beta", "l1", "l2")}
FTRL_DEFAULTS = {"lr": 0.1, "beta": 1.0, "l1": 0.0, "l2": 0.0}


def _uniforms(seed: int, ids: np.ndarray, cols: int) -> np.ndarray:
    """(len(ids), cols) float64 in [0, 1): element (r, j) is output j of splitmix64 seeded with
    splitmix64(id_r ^ splitmix64(seed)), its top 53 bits scaled by 2**-53. A counter-based
    stream: nothing depends on the other ids in the batch or on their order."""
    key = splitmix64(np.array([seed], np.uint64))[0]
    row_keys = splitmix64(ids.astype(np.int64, copy=False).view(np.uint64) ^ key)
    counters = np.arange(1, cols + 1, dtype=np.uint64) * np.uint64(SPLITMIX64_GAMMA)  # wraps mod 2**64
    words = mix64(row_keys[:, None] + counters[None, :])
    words >>= np.uint64(11)
    return words.astype(np.float64) * 2.0 ** -53


def initial_rows(init: RowInit, ids: np.ndarray, width: int, dtype="float32") -> np.ndarray:
    """The initial rows of ``ids``: (len(ids), width) in ``dtype``, row r a function of
    (init, ids[r]) alone, computed in float64 and rounded once to ``dtype``.

    uniform: column j is low + (high - low) * u_j. normal: Box-Muller with h = ceil(width / 2)
    pairs (u_k, u_{h+k}) -> radius sqrt(-2 ln(1 - u_k)), angle 2 pi u_{h+k}: column k is
    mean + std * radius * cos(angle), column h + k the sine (the last sine dropped for an odd
    width). The integer stream is the same bit for bit everywhere and uniform rows are exact
    arithmetic on it; normal rows go through log, cos and sin, whose last float64 bit may
    differ between math libraries (not between calls or processes on one build).
    """
    dtype = np.dtype(dtype)
    m = len(ids)
    if init.kind == "zeros":
        return np.zeros((m, width), dtype)
    if init.kind == "constant":
        return np.full((m, width), init.value, dtype)
    if init.kind == "uniform":
        u = _uniforms(init.seed, ids, width)
        u *= init.high - init.low
        u += init.low
        return u.astype(dtype, copy=False)
    h = (width + 1) // 2
    u = _uniforms(init.seed, ids, 2 * h)
    radius = np.log1p(np.negative(u[:, :h]))  # 1 - u is in (0, 1]: the log is finite
    radius *= -2.0
    np.sqrt(radius, out=radius)
    radius *= init.std
    angle = u[:, h:]
    angle *= 2.0 * np.pi
    out = np.empty((m, width), dtype)
    np.cos(angle[:, :h], out=u[:, :h])  # u's first half is free once radius is computed
    u[:, :h] *= radius
    np.add(u[:, :h], init.mean, out=out[:, :h], casting="same_kind")
    np.sin(angle[:, :width - h], out=angle[:, :width - h])
    angle[:, :width - h] *= radius[:, :width - h]
    np.add(angle[:, :width - h], init.mean, out=out[:, h:], casting="same_kind")
    return out


# -- per-row optimizers ----------------------------------------------------------------------------
def sparse_config(config: OptimizerConfig | Mapping | None) -> dict:
    """The resolved hyper-parameters {"name": ..., <its fields>} of a sparse optimizer config.

    sgd/adagrad/adam: an OptimizerConfig or its dict, validated and defaulted by OptimizerConfig;
    settings sparse tables do not implement (weight_decay, momentum, clipping, schedules, ...)
    must be left at their defaults. ftrl: a dict of lr (the paper's alpha), beta, l1, l2 (FTRL_DEFAULTS)."""
    if config is None:
        config = {"name": "sgd"}
    if isinstance(config, OptimizerConfig) and config.name == "ftrl":
        return _ftrl_config({"name": "ftrl", "lr": config.lr, "beta": config.beta, "l1": config.l1, "l2": config.l2})
    if isinstance(config, OptimizerConfig):
        cfg = config
    elif isinstance(config, Mapping):
        name = config.get("name", "sgd")
        if name not in SPARSE_OPTIMIZERS:
            raise InvalidArgument(f"unknown optimizer {name!r} for a sparse table: expected one of "
                                  f"{', '.join(SPARSE_OPTIMIZERS)}")
        if name == "ftrl":
            return _ftrl_config(config)
        try:
            cfg = OptimizerConfig.from_dict(config)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"sparse {name} optimizer: {e}") from None
    else:
        raise InvalidArgument(f"optimizer config must be an OptimizerConfig or a dict, got {config!r}")
    if cfg.name not in _HYPER:
        raise InvalidArgument(f"unknown optimizer {cfg.name!r} for a sparse table: expected one of "
                              f"{', '.join(SPARSE_OPTIMIZERS)}")
    mine, base = cfg.to_dict(), OptimizerConfig(name=cfg.name).to_dict()
    for key, value in mine.items():
        if key != "name" and key not in _HYPER[cfg.name] and value != base[key]:
            raise InvalidArgument(f"sparse {cfg.name} optimizer: {key}={value!r} is not supported by sparse "
                                  f"tables; leave it unset")
    return {"name": cfg.name, **{k: mine[k] for k in _HYPER[cfg.name]}}


def _ftrl_config(config: Mapping) -> dict:
    config = dict(config)
    if "alpha" in config:
        if "lr" in config:
            raise InvalidArgument("sparse ftrl optimizer: give lr or alpha (the same setting), not both")
        config["lr"] = config.pop("alpha")
    unknown = set(config) - {"name", *FTRL_DEFAULTS}
    if unknown:
        raise InvalidArgument(f"sparse ftrl optimizer: unknown option(s) {sorted(unknown)}: expected "
                              f"{', '.join(FTRL_DEFAULTS)}")
    out = {"name": "ftrl"}
    for key, default in FTRL_DEFAULTS.items():
        out[key] = _number(f"sparse ftrl optimizer: {key}", config.get(key, default))
    if out["lr"] <= 0:
        raise InvalidArgument(f"sparse ftrl optimizer: lr (the paper's alpha) must be > 0, got {out['lr']}")
    for key in ("beta", "l1", "l2"):
        if out[key] < 0:
            raise InvalidArgument(f"sparse ftrl optimizer: {key} must be >= 0, got {out[key]}")
    if out["beta"] == 0 and out["l2"] == 0:
        # n starts at 0, so the weights' denominator (beta + sqrt(n)) / alpha + l2 would be 0
        raise InvalidArgument("sparse ftrl optimizer: beta must be > 0 (or l2 > 0): a new row's weights "
                              "divide by (beta + sqrt(n)) / lr + l2 with n = 0")
    return out


class RowOptimizer:
    """Updates gathered rows in place: ``apply(w, state, g, t)`` with w, g and each state array
    (m, width) and t (m,) each row's update number (1-based, the row's own count)."""

    state_names: tuple[str, ...] = ()

    def __init__(self, config: dict):
        self.config = config
        self.__dict__.update({k: v for k, v in config.items() if k != "name"})

    @property
    def name(self) -> str:
        return self.config["name"]

    def init_state(self, w0: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(w0) for k in self.state_names}

    def apply(self, w, state, g, t) -> None:
        raise NotImplementedError


# The updates below work in place with one or two scratch arrays of the rows' shape: each
# temporary NumPy would otherwise allocate costs a pass over memory (Adam: 180 -> 110 ms for
# 100k rows of 64 float32 on this 2-core box).
class RowSGD(RowOptimizer):
    """w -= lr * g."""

    def apply(self, w, state, g, t):
        w -= self.lr * g


class RowAdagrad(RowOptimizer):
    """torch.optim.Adagrad per row: sum += g^2; w -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)."""

    state_names = ("sum",)

    def init_state(self, w0):
        return {"sum": np.full_like(w0, self.initial_accumulator_value)}

    def apply(self, w, state, g, t):
        acc = state["sum"]
        x = np.multiply(g, g)
        acc += x
        np.sqrt(acc, out=x)
        x += self.eps
        np.divide(g, x, out=x)
        x *= (self.lr / (1.0 + (t - 1) * self.lr_decay)).astype(w.dtype)[:, None]
        w -= x


class RowAdam(RowOptimizer):
    """torch.optim.Adam per row, bias-corrected with each row's own update count t:
    m += (1 - beta1) (g - m); v = beta2 v + (1 - beta2) g^2;
    w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)."""

    state_names = ("exp_avg", "exp_avg_sq")

    def apply(self, w, state, g, t):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        tf = t.astype(np.float64)
        step = (self.lr / (1.0 - self.beta1 ** tf)).astype(w.dtype)[:, None]
        bc2_sqrt = np.sqrt(1.0 - self.beta2 ** tf).astype(w.dtype)[:, None]
        x = np.subtract(g, m)
        x *= 1.0 - self.beta1
        m += x
        v *= self.beta2
        np.multiply(g, g, out=x)
        x *= 1.0 - self.beta2
        v += x
        np.sqrt(v, out=x)
        x /= bc2_sqrt
        x += self.eps
        np.divide(m, x, out=x)
        x *= step
        w -= x


class RowFTRL(RowOptimizer):
    """FTRL-Proximal (McMahan et al. 2013, Algorithm 1), per coordinate, with state z and n
    (alpha is the config's lr):

        sigma = (sqrt(n + g^2) - sqrt(n)) / alpha;  z += g - sigma * w;  n += g^2
        w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2)

    The stored row is w as computed from (z, n) after each update. The paper starts at z = 0
    (w = 0); a row with a nonzero initial w0 starts at z0 = -(w0 ((beta / alpha) + l2) + sign(w0) l1),
    the z whose weights are w0, so a pull sees the same row before and after it is stored."""

    state_names = ("z", "n")

    def init_state(self, w0):
        z = -(w0 * (self.beta / self.lr + self.l2) + np.sign(w0) * self.l1)
        return {"z": z.astype(w0.dtype, copy=False), "n": np.zeros_like(w0)}

    def apply(self, w, state, g, t):
        z, n = state["z"], state["n"]
        x = np.sqrt(n)
        y = np.multiply(g, g)
        n += y
        np.sqrt(n, out=y)           # y: sqrt of the new n
        x -= y                      # x: -sigma * alpha
        x *= w
        x *= 1.0 / self.lr
        z += x                      # z += g - sigma * w
        z += g
        self.weights(z, y, out=w)

    def weights(self, z, sqrt_n, out):
        """w from (z, sqrt(n)) into ``out``; ``sqrt_n`` is overwritten."""
        denom = sqrt_n
        denom += self.beta
        denom *= 1.0 / self.lr
        denom += self.l2
        np.sign(z, out=out)
        out *= -self.l1
        out += z                    # z - sign(z) l1
        np.divide(out, denom, out=out)
        np.negative(out, out=out)
        out[np.abs(z) <= self.l1] = 0.0  # exactly 0: the l1 sparsity


_ROW_OPTIMIZERS = {"sgd": RowSGD, "adagrad": RowAdagrad, "adam": RowAdam, "ftrl": RowFTRL}


def make_row_optimizer(config: OptimizerConfig | Mapping | None) -> RowOptimizer:
    cfg = sparse_config(config)
    return _ROW_OPTIMIZERS[cfg["name"]](cfg)


# -- grouping a request's ids (pure: done before the lock) ---------------------------------------
def _group(ids: np.ndarray):
    """(sorted distinct ids, the stable sort order of ids, the start of each run in sorted order,
    inverse: position of each id's row among the distinct ones)."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    first = np.ones(len(s), bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    inverse = np.empty(len(s), np.intp)
    inverse[order] = np.cumsum(first) - 1
    return s[starts], order, starts, inverse


def _sum_runs(g: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum the rows of each run of ``g`` (runs begin at ``starts``), left to right in request
    order. np.add.at adds the repeats onto each run's first row: a tenth of the time of
    np.add.reduceat on mostly-distinct ids, and strictly sequential (reduceat pairs differently)."""
    if len(starts) == len(g):
        return g
    first = np.zeros(len(g), bool)
    first[starts] = True
    run = np.cumsum(first) - 1
    rest = np.flatnonzero(~first)
    out = g[starts]
    np.add.at(out, run[rest], g[rest])
    return out


def _first_nonfinite(a: np.ndarray) -> str:
    bad = ~np.isfinite(a)
    r, c = np.argwhere(bad)[0]
    return f"{int(bad.sum())} non-finite value(s), first at row {r}, column {c}: {a[r, c]}"


# -- the table -------------------------------------------------------------------------------------
class SparseTable:
    """Rows of one table on one shard; see the module docstring for the rules."""

    _GROW_MIN = 64

    def __init__(self, spec: TableSpec, optimizer: OptimizerConfig | Mapping | None = None):
        if not isinstance(spec, TableSpec):
            raise InvalidArgument(f"sparse table: spec must be a TableSpec, got {spec!r}")
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        try:
            self.optimizer = make_row_optimizer(optimizer)
        except InvalidArgument as e:
            raise InvalidArgument(f"table '{spec.name}': {e}") from None
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        w = self.spec.width
        self._index = IdIndex()                       # id -> row
        self._ids = np.zeros(0, np.int64)             # row -> id; rows [0, _n) are in use
        self._w = np.zeros((0, w), self.dtype)
        self._state = {k: np.zeros((0, w), self.dtype) for k in self.optimizer.state_names}
        self._row_steps = np.zeros(0, np.int64)       # updates applied to the row (adam's t)
        self._touched = np.zeros(0, np.int64)         # table step the row was last pulled/pushed
        self._n = 0
        self._pending: dict[int, list[int]] = {}      # id -> [sightings, step of the last one]
        self._applied: dict[str, int] = {}            # client_id -> highest seq applied
        self._step = 0                                # pushes applied
        self._counts = {"admitted": 0, "evicted": 0, "duplicates": 0, "pulls": 0}

    # -- reads -------------------------------------------------------------------------------
    def pull(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids``, (len(ids), width), in request order; repeats allowed. An id with
        no row gets its initial row (stored when admit_after <= 1, else not stored)."""
        ids = self._check_ids(ids, f"pull from table '{self.spec.name}'")
        uniq, _, _, inverse = _group(ids)
        rows_u = np.empty((len(uniq), self.spec.width), self.dtype)
        with self._lock:
            idx = self._lookup(uniq)
            missing = idx < 0
            if self.spec.admit_after <= 1 and missing.any():
                idx[missing] = self._create(uniq[missing], self._step)
                missing[:] = False
            have = ~missing
            rows = idx[have]
            rows_u[have] = self._w[rows]
            self._touched[rows] = self._step
            self._counts["pulls"] += 1
        if missing.any():  # pure: outside the lock
            rows_u[missing] = initial_rows(self.spec.init, uniq[missing], self.spec.width, self.dtype)
        return rows_u[inverse]

    # -- updates -----------------------------------------------------------------------------
    def push(self, ids: np.ndarray, grads: np.ndarray, client_id: str, seq: int, scale: float = 1.0) -> bool:
        """Apply one push: gradients of each id summed (in request order) and times ``scale``, then
        one optimizer update per distinct admitted id. Returns False, changing nothing, for a
        duplicate (seq not above the highest applied for client_id)."""
        what = f"push to table '{self.spec.name}'"
        ids = self._check_ids(ids, what)
        if not isinstance(client_id, str) or not client_id:
            raise InvalidArgument(f"{what}: client_id must be a non-empty string (needed to apply each push "
                                  f"once), got {client_id!r}")
        seq = _integer(f"{what}: seq", seq, 0, (1 << 64) - 1)
        scale = _number(f"{what}: scale", scale)
        if scale < 0:
            raise InvalidArgument(f"{what}: scale must be >= 0, got {scale}")
        g = self._check_grads(grads, len(ids), what)
        uniq, order, starts, _ = _group(ids)
        g = _sum_runs(g[order], starts)
        if scale != 1.0:
            with np.errstate(over="ignore"):
                g *= scale
        if not np.isfinite(g).all():
            raise InvalidArgument(f"{what}: the summed, scaled gradients overflow {self.dtype}: "
                                  f"{_first_nonfinite(g)} (rows: distinct ids in ascending order)")
        with self._lock:
            last = self._applied.get(client_id)
            if last is not None and seq <= last:
                self._counts["duplicates"] += 1
                return False
            step = self._step + 1
            idx = self._lookup(uniq)
            missing = np.flatnonzero(idx < 0)
            if len(missing):
                idx[missing] = self._admit(uniq[missing], step)
            ok = idx >= 0
            rows = idx[ok] if not ok.all() else idx
            if len(rows) < len(idx):
                g = g[ok]
            self._row_steps[rows] += 1
            self._update(rows, g)
            self._touched[rows] = step
            self._step = step
            self._applied[client_id] = seq
        return True

    def _update(self, rows: np.ndarray, g: np.ndarray) -> None:
        """The optimizer on rows (distinct) gathered into contiguous copies, then scattered back."""
        w = self._w[rows]
        state = {k: a[rows] for k, a in self._state.items()}
        self.optimizer.apply(w, state, g, self._row_steps[rows])
        self._w[rows] = w
        for k, a in self._state.items():
            a[rows] = state[k]

    def _admit(self, keys: np.ndarray, step: int) -> np.ndarray:
        """Rows for ids pushed but not stored (-1 where still not admitted); counts the sightings."""
        k = self.spec.admit_after
        if k <= 1:
            return self._create(keys, step)
        pending = self._pending
        key_list = keys.tolist()
        seen = np.fromiter((pending[x][0] + 1 if x in pending else 1 for x in key_list), np.int64, len(key_list))
        admit = seen >= k
        out = np.full(len(keys), -1, np.int64)
        if admit.any():
            out[admit] = self._create(keys[admit], step)  # may grow (allocate) first: pending is updated after
        for x, c, a in zip(key_list, seen.tolist(), admit.tolist()):
            if a:
                pending.pop(x, None)
            else:
                pending[x] = [c, step]
        return out

    def _create(self, keys: np.ndarray, step: int) -> np.ndarray:
        """Store rows for ids not held, at their initial values; returns their row numbers."""
        m, n = len(keys), self._n
        self._reserve(n + m)
        w0 = initial_rows(self.spec.init, keys, self.spec.width, self.dtype)
        self._w[n:n + m] = w0
        for name, value in self.optimizer.init_state(w0).items():
            self._state[name][n:n + m] = value
        self._ids[n:n + m] = keys
        self._row_steps[n:n + m] = 0
        self._touched[n:n + m] = step
        self._index.insert(keys, np.arange(n, n + m, dtype=np.int64))
        self._n = n + m
        self._counts["admitted"] += m
        return np.arange(n, n + m, dtype=np.int64)

    def _reserve(self, rows: int) -> None:
        cap = len(self._ids)
        if rows > cap:
            self._resize(max(rows, 2 * cap, self._GROW_MIN))

    def _resize(self, cap: int) -> None:
        """Reallocate every per-row array to ``cap`` rows, keeping the first _n (new ones are built
        before any is swapped in, so a MemoryError leaves the table as it was)."""
        n = self._n

        def grown(a):
            b = np.zeros((cap,) + a.shape[1:], a.dtype)
            b[:n] = a[:n]
            return b
        ids, w, rs, tc = grown(self._ids), grown(self._w), grown(self._row_steps), grown(self._touched)
        state = {k: grown(a) for k, a in self._state.items()}
        self._ids, self._w, self._row_steps, self._touched, self._state = ids, w, rs, tc, state

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where not stored."""
        return self._index.lookup(keys)

    # -- eviction ----------------------------------------------------------------------------
    def evict(self) -> int:
        """Drop rows (and pending sightings) not touched for evict_after steps; returns rows dropped.

        Rows from the end fill the holes (swap-remove), so the work is per dropped row."""
        t = self.spec.evict_after
        if t == 0:
            return 0
        with self._lock:
            n = self._n
            dead = np.flatnonzero(self._step - self._touched[:n] >= t)
            stale = [x for x, (_, last) in self._pending.items() if self._step - last >= t]
            for x in stale:
                del self._pending[x]
            if len(dead) == 0:
                return 0
            keep = n - len(dead)
            live_tail = np.ones(n - keep, bool)
            live_tail[dead[dead >= keep] - keep] = False
            holes = dead[dead < keep]
            movers = np.flatnonzero(live_tail) + keep  # as many as holes
            self._index.delete(self._ids[dead])
            for a in (self._ids, self._w, self._row_steps, self._touched, *self._state.values()):
                a[holes] = a[movers]
            self._index.move(self._ids[holes], holes)
            self._n = keep
            self._counts["evicted"] += len(dead)
            if len(self._ids) > 4 * max(keep, self._GROW_MIN):  # give memory back after a big eviction
                self._resize(2 * max(keep, self._GROW_MIN))
            return len(dead)

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        """rows stored; bytes held (row and state arrays and the id index as allocated, plus an
        estimate of pending sightings);
        admitted (rows ever created), pending (ids seen but not admitted), evicted, step (pushes
        applied), duplicates (pushes refused as replays), pulls, clients (exactly-once records)."""
        with self._lock:
            arrays = self._ids.nbytes + self._w.nbytes + self._row_steps.nbytes + self._touched.nbytes \
                + sum(a.nbytes for a in self._state.values())
            index = self._index.nbytes
            pending = sys.getsizeof(self._pending) + 150 * len(self._pending)
            return {"rows": self._n, "bytes": arrays + index + pending, "admitted": self._counts["admitted"],
                    "pending": len(self._pending), "evicted": self._counts["evicted"], "step": self._step,
                    "duplicates": self._counts["duplicates"], "pulls": self._counts["pulls"],
                    "clients": len(self._applied)}

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta): the table's whole state as numpy arrays (copies, in storage order) and
        JSON-able metadata (spec, optimizer, step, exactly-once records, counters). No pickle."""
        with self._lock:
            n = self._n
            pend = list(self._pending.items())
            arrays = {"ids": self._ids[:n].copy(), "weights": self._w[:n].copy(),
                      "row_steps": self._row_steps[:n].copy(), "touched": self._touched[:n].copy(),
                      "pending_ids": np.array([x for x, _ in pend], np.int64).reshape(-1),
                      "pending_counts": np.array([c for _, (c, _) in pend], np.int64).reshape(-1),
                      "pending_steps": np.array([s for _, (_, s) in pend], np.int64).reshape(-1)}
            for k, a in self._state.items():
                arrays[f"state.{k}"] = a[:n].copy()
            meta = {"format": SNAPSHOT_FORMAT, "spec": self.spec.to_dict(), "optimizer": dict(self.optimizer.config),
                    "step": self._step, "applied": dict(self._applied), "counts": dict(self._counts)}
        return arrays, meta

    @classmethod
    def from_snapshot(cls, arrays: Mapping[str, np.ndarray], meta: Mapping) -> SparseTable:
        """A new table holding a snapshot (its spec and optimizer from the metadata)."""
        if not isinstance(meta, Mapping) or not isinstance(meta.get("spec"), Mapping) or "optimizer" not in meta:
            raise InvalidArgument("restore sparse table: the metadata has no spec or optimizer")
        table = cls(TableSpec.from_dict(meta["spec"]), meta["optimizer"])
        table.restore(arrays, meta)
        return table

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Replace this table's contents with a snapshot of a table of the same spec and optimizer.
        Everything is checked and built first; a bad snapshot leaves the table as it was."""
        what = f"restore table '{self.spec.name}'"
        if not isinstance(meta, Mapping) or meta.get("format") != SNAPSHOT_FORMAT:
            raise InvalidArgument(f"{what}: unknown snapshot format {meta.get('format') if isinstance(meta, Mapping) else meta!r}")
        if meta.get("spec") != self.spec.to_dict():
            raise InvalidArgument(f"{what}: the snapshot's spec {meta.get('spec')} is not this table's {self.spec.to_dict()}")
        opt = meta.get("optimizer")
        if not isinstance(opt, Mapping) or dict(opt) != self.optimizer.config:
            raise InvalidArgument(f"{what}: the snapshot's optimizer {meta.get('optimizer')} is not this table's "
                                  f"{self.optimizer.config}")
        names = ["ids", "weights", "row_steps", "touched", "pending_ids", "pending_counts", "pending_steps"] \
            + [f"state.{k}" for k in self.optimizer.state_names]
        if set(arrays) != set(names):
            raise InvalidArgument(f"{what}: arrays {sorted(arrays)}, expected {sorted(names)}")
        n, w = len(arrays["ids"]), self.spec.width
        want = {"ids": ((n,), np.int64), "weights": ((n, w), self.dtype), "row_steps": ((n,), np.int64),
                "touched": ((n,), np.int64)}
        want.update({f"state.{k}": ((n, w), self.dtype) for k in self.optimizer.state_names})
        p = len(arrays["pending_ids"])
        want.update({k: ((p,), np.int64) for k in ("pending_ids", "pending_counts", "pending_steps")})
        for k, (shape, dtype) in want.items():
            a = arrays[k]
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
                got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise InvalidArgument(f"{what}: '{k}' is {got}, expected {np.dtype(dtype)}{list(shape)}")
        distinct = len(np.unique(arrays["ids"]))
        if distinct != n:
            raise InvalidArgument(f"{what}: 'ids' holds {n - distinct} repeated id(s)")
        index = IdIndex.of(arrays["ids"], np.arange(n, dtype=np.int64))
        try:
            step = _integer(f"{what}: step", meta.get("step"), 0, 1 << 62)
            applied = {str(c): _integer(f"{what}: seq of client {c!r}", s, 0, (1 << 64) - 1)
                       for c, s in dict(meta.get("applied", {})).items()}
            counts = {k: _integer(f"{what}: count {k}", dict(meta.get("counts", {})).get(k, 0), 0, 1 << 62)
                      for k in ("admitted", "evicted", "duplicates", "pulls")}
        except (TypeError, ValueError) as e:
            raise InvalidArgument(str(e)) from None
        pending = {x: [c, s] for x, c, s in zip(arrays["pending_ids"].tolist(), arrays["pending_counts"].tolist(),
                                                arrays["pending_steps"].tolist())}
        with self._lock:
            self._index = index
            self._ids = arrays["ids"].copy()
            self._w = arrays["weights"].copy()
            self._row_steps = arrays["row_steps"].copy()
            self._touched = arrays["touched"].copy()
            self._state = {k: arrays[f"state.{k}"].copy() for k in self.optimizer.state_names}
            self._n = n
            self._pending, self._applied, self._step, self._counts = pending, applied, step, counts

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def _check_ids(ids, what: str) -> np.ndarray:
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
            got = f"{ids.dtype}{list(ids.shape)}" if isinstance(ids, np.ndarray) else type(ids).__name__
            raise InvalidArgument(f"{what}: ids must be a 1-D int64 array, got {got}")
        return ids

    def _check_grads(self, grads, n: int, what: str) -> np.ndarray:
        """The gradients as a (n, width) array of the table's dtype (a new array: the caller's is
        never written), after checking shape, dtype and that every value is finite."""
        w = self.spec.width
        if not isinstance(grads, np.ndarray):
            raise InvalidArgument(f"{what}: grads must be a numpy array, got {type(grads).__name__}")
        if grads.shape != (n, w):
            raise InvalidArgument(f"{what}: grads must have shape ({n}, {w}) (one row of the table's width {w} "
                                  f"per id), got {list(grads.shape)}")
        if grads.dtype.kind not in "fiu":
            raise InvalidArgument(f"{what}: grads must be real numbers (float or integer), got {grads.dtype}")
        if grads.dtype.kind == "f" and not np.isfinite(grads).all():
            raise InvalidArgument(f"{what}: grads hold {_first_nonfinite(grads)}")
        with np.errstate(over="ignore"):  # an overflow is reported just below, not warned about
            g = grads.astype(self.dtype)  # always a copy
        if not np.isfinite(g).all():
            raise InvalidArgument(f"{what}: grads overflow {self.dtype}: {_first_nonfinite(g)}")
        return g

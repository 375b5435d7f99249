"""Checkpoint files: one safetensors file per shard, written atomically through fsspec.

A shard writes the slices it is primary of (each slice is written once, by its primary):
for slice ``T@O`` (tensor T from offset O) the arrays ``T@O/param`` and ``T@O/state/NAME``
(optimizer state), and in the file's metadata, under "paramserver", JSON with the model's
optimizer and per slice its shape, dtype, offset, length, version (updates applied: the step
Adam's bias correction continues from), pushes and exactly-once records. The file is written
under a temporary name and renamed, so a file that exists is whole; the checkpoint's manifest
(written last, by whoever coordinates it) names the files and their sizes, so a checkpoint is
whole only when its manifest is there and every file matches it.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import fsspec
import numpy as np

from ps.errors import InvalidArgument, NotFound
from ps.v1 import server_pb2

META_KEY = "paramserver"
FORMAT = 1


def _fs(url: str):
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise InvalidArgument(f"checkpoint url '{url}': {e}") from None


@contextlib.contextmanager
def _nameable(url: str):
    """A path the file system cannot name (a NUL byte, ...) is the caller's error, naming the URL."""
    try:
        yield
    except ValueError as e:
        raise InvalidArgument(f"checkpoint url '{url[:200]}': {e}") from None


def check_absolute(url: str, what: str) -> None:
    """A checkpoint location is an absolute path or a URL: a relative one would land wherever the
    writing process happens to run."""
    if "://" not in url and not url.startswith("/"):
        raise InvalidArgument(f"{what}: checkpoint url '{url[:200]}' must be an absolute path or a URL "
                              f"(file:///..., s3://...)")


def write_atomic(url: str, name: str, data: bytes) -> str:
    """``data`` to ``url/name``: written under a temporary name, then renamed. Returns the path."""
    with _nameable(url):
        return _write_atomic(url, name, data)


def _write_atomic(url: str, name: str, data: bytes) -> str:
    fs, root = _fs(url)
    fs.makedirs(root, exist_ok=True)
    final = f"{root.rstrip('/')}/{name}"
    tmp = f"{root.rstrip('/')}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, final)
    return final


def read_bytes(url: str, name: str) -> bytes:
    fs, root = _fs(url)
    path = f"{root.rstrip('/')}/{name}"
    try:
        with _nameable(url), fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(f"checkpoint {url}: {name} is missing") from None


def slice_key(tensor: str, offset: int) -> str:
    return f"{tensor}@{offset}"


def encode_shard(model: str, optimizer: dict, snapshots: list[server_pb2.SliceSnapshot], dtypes: dict) -> bytes:
    """A shard's slices as one safetensors file (bytes)."""
    from safetensors.numpy import save
    from ps.tensor import decode_1d
    arrays, slices = {}, []
    for snap in snapshots:
        key = slice_key(snap.tensor, snap.offset)
        arrays[f"{key}/param"] = decode_1d(snap.param)
        for k, v in snap.state.items():
            arrays[f"{key}/state/{k}"] = decode_1d(v)
        slices.append({"tensor": snap.tensor, "shape": list(snap.shape), "dtype": dtypes[snap.tensor],
                       "offset": snap.offset, "length": snap.length, "version": snap.version, "pushes": snap.pushes,
                       "applied": [[r.client_id, r.seq, r.end, r.step] for r in snap.applied]})
    meta = {"format": FORMAT, "model": model, "optimizer": optimizer, "slices": slices}
    return save(arrays, metadata={META_KEY: json.dumps(meta)})


def decode_shard(data: bytes, what: str) -> tuple[dict, list[server_pb2.SliceSnapshot]]:
    """(metadata, slice snapshots) of a file ``encode_shard`` wrote."""
    from safetensors.numpy import load
    import struct
    from ps.tensor import encode
    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][META_KEY])
        arrays = load(data)
    except (KeyError, ValueError, struct.error) as e:
        raise InvalidArgument(f"{what}: not a paramserver checkpoint file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise InvalidArgument(f"{what}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    snaps = []
    for s in meta["slices"]:
        key = slice_key(s["tensor"], s["offset"])
        param = arrays.get(f"{key}/param")
        if param is None or param.size != s["length"]:
            raise InvalidArgument(f"{what}: slice {key} has no parameters of {s['length']} values")
        snap = server_pb2.SliceSnapshot(tensor=s["tensor"], shape=s["shape"], offset=s["offset"], length=s["length"],
                                        param=encode(np.ascontiguousarray(param)), version=s["version"],
                                        pushes=s["pushes"])
        prefix = f"{key}/state/"
        for name, a in arrays.items():
            if name.startswith(prefix):
                encode(np.ascontiguousarray(a), snap.state[name[len(prefix):]])
        for cid, seq, end, step in s["applied"]:
            snap.applied.add(client_id=cid, seq=seq, end=end, step=step)
        snaps.append(snap)
    return meta, snaps


# -- whole checkpoints: the shards' files plus a manifest ---------------------------------------
MANIFEST = "manifest.json"


def write_manifest(url: str, manifest: dict) -> str:
    """The manifest, last: a checkpoint directory without one (or whose files do not match it)
    is not a checkpoint."""
    return write_atomic(url, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def take(client, model: str, url: str, extra: dict | None = None) -> dict:
    """Checkpoint ``model`` to ``url``: every shard's primary writes its slices (in parallel), then
    the manifest is written, naming each file and its size. Returns the manifest."""
    import time as _time
    m = client.model(model)
    results = []

    def one(shard: int):
        address = m.shards[shard]
        req = server_pb2.CheckpointRequest(model=model, url=url, shard=f"shard-{shard}")
        results.append((shard, client.call(client.server(address).Checkpoint, req,
                                           f"checkpoint '{model}' shard {shard}", address)))
    client.map(one, [(i,) for i in range(len(m.shards)) if m._slices_of(i)])
    results.sort(key=lambda r: r[0])
    manifest = {
        "format": FORMAT, "model": model, "created": _time.time(),
        "optimizer": m.optimizer.to_dict(),
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in m.specs.values()],
        "files": [{"name": f, "bytes": r.bytes, "shard": shard} for shard, r in results for f in r.files],
        "slices": [{"tensor": v.tensor, "offset": v.offset, "version": v.version, "file": r.files[0]}
                   for _, r in results for v in r.versions],
        "bytes": sum(r.bytes for _, r in results),
        **(extra or {}),
    }
    write_manifest(url, manifest)
    return manifest


def read_manifest(url: str) -> dict:
    """A checkpoint's manifest, after checking that every file it names is there, whole."""
    try:
        manifest = json.loads(read_bytes(url, MANIFEST))
    except NotFound:
        raise NotFound(f"checkpoint {url}: no {MANIFEST} (not a checkpoint, or one that was never finished)") from None
    except ValueError as e:
        raise InvalidArgument(f"checkpoint {url}: {MANIFEST} is not JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise InvalidArgument(f"checkpoint {url}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    fs, root = _fs(url)
    for f in manifest["files"]:
        path = f"{root.rstrip('/')}/{f['name']}"
        try:
            with _nameable(url):
                size = fs.size(path)
        except FileNotFoundError:
            raise NotFound(f"checkpoint {url}: {f['name']} is missing") from None
        if size != f["bytes"]:
            raise InvalidArgument(f"checkpoint {url}: {f['name']} has {size} bytes, the manifest says {f['bytes']}")
    return manifest


def load(url: str) -> tuple[dict, dict[str, dict[str, np.ndarray]], dict[tuple[str, int], dict]]:
    """A checkpoint in memory: (manifest, tensor -> {"param": whole flat array, state name: ...},
    (tensor, offset) -> the slice's metadata: length, version, pushes, applied records)."""
    manifest = read_manifest(url)
    dtypes = {t["name"]: np.dtype(t["dtype"]) for t in manifest["tensors"]}
    sizes = {t["name"]: int(np.prod(t["shape"], dtype=np.int64)) for t in manifest["tensors"]}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    slices = {}
    for f in manifest["files"]:
        _, snaps = decode_shard(read_bytes(url, f["name"]), f"checkpoint {url}/{f['name']}")
        from ps.tensor import decode_1d
        for s in snaps:
            if s.tensor not in dtypes:
                raise InvalidArgument(f"checkpoint {url}/{f['name']}: tensor '{s.tensor}' is not in the manifest")
            whole = arrays.setdefault(s.tensor, {})
            for key, msg in [("param", s.param), *s.state.items()]:
                a = whole.setdefault(key, np.zeros(sizes[s.tensor], dtypes[s.tensor]))
                a[s.offset:s.offset + s.length] = decode_1d(msg)
            slices[(s.tensor, s.offset)] = {"length": s.length, "version": s.version, "pushes": s.pushes,
                                            "applied": [(r.client_id, r.seq, r.end, r.step) for r in s.applied]}
    covered = {t: sum(v["length"] for (tt, _), v in slices.items() if tt == t) for t in sizes}
    short = [t for t in sizes if covered[t] != sizes[t]]
    if short:
        raise InvalidArgument(f"checkpoint {url}: tensor(s) {', '.join(short)} not wholly covered by its files")
    return manifest, arrays, slices


def snapshots_for(plan_slices, specs: dict, arrays: dict, slices: dict) -> dict[int, list[server_pb2.SliceSnapshot]]:
    """The checkpoint cut to a model's current plan: shard -> snapshots of its slices. A slice laid
    out as in the checkpoint keeps its version and exactly-once records; one cut differently takes
    the version of the checkpoint slice holding its first element."""
    from ps.tensor import encode
    out: dict[int, list] = {}
    for s in plan_slices:
        spec = specs[s.tensor]
        whole = arrays[s.tensor]
        same = slices.get((s.tensor, s.offset))
        if same is not None and same["length"] != s.length:
            same = None
        src = same or next(v for (t, o), v in sorted(slices.items()) if t == s.tensor and o <= s.offset < o + v["length"])
        snap = server_pb2.SliceSnapshot(tensor=s.tensor, shape=list(spec.shape), offset=s.offset, length=s.length,
                                        param=encode(whole["param"][s.offset:s.stop]), version=src["version"],
                                        pushes=src["pushes"] if same else 0)
        for k, a in whole.items():
            if k != "param":
                encode(a[s.offset:s.stop], snap.state[k])
        if same is not None:
            for cid, seq, end, step in same["applied"]:
                snap.applied.add(client_id=cid, seq=seq, end=end, step=step)
        out.setdefault(s.shard, []).append(snap)
    return out

"""Where a job's data may come from: the local roots and fsspec protocols a scheduler and its
workers read under (``--data-root`` / ``PS_DATA_ROOTS``, ``--data-protocols`` /
``PS_DATA_PROTOCOLS``).

A job spec names its data by URI (``ps.spec.DataSpec``): a local path, an fsspec URL (chained
ones too, ``zip://member::s3://bucket/a.zip``), ``builtin:NAME`` or ``synthetic:KIND?...``.
Without a policy (no roots, no protocols: a laptop's default) any of them is read, as a user
running their own cluster expects. With one, the scheduler refuses a spec at submission and the
workers refuse to open (defence in depth: they resolve paths on their own file systems) any
location outside it:

* ``builtin:`` and ``synthetic:`` are always allowed; a ``synthetic:`` URI's sizes are always
  bounded (``SYNTHETIC_MAX_*``), policy or not, since a generator materialises all of it at once.
* a local path (a plain path, ``file://``, ``file:``, ``local://``) must be absolute and
  resolve (``os.path.realpath``: ``..`` and symlinks cannot escape) under a local root, compared
  by path components (``/data2`` is not under ``/data``). No local root: no local files.
* a URL of another protocol needs that protocol in ``protocols``, or must lie under a URL root
  of that protocol (``s3://bucket/train``), compared by components after percent-decoding.
* in a chained URL every link is checked by these rules: each protocol must be allowed, and
  each link that names a location (a local path, a URL) must pass; ``reference`` (whose file
  names further locations the policy cannot see) is never allowed.
* when restricted: no ``.`` / ``..`` / empty segments in URLs, no glob characters (``*?[]``;
  ``?`` starts the query of an http(s) URL), no NUL.

Refusals raise ``ps.errors.PermissionDenied`` (PERMISSION_DENIED); a ``synthetic:`` size over
a bound raises ``ResourceExhausted``, an unreadable size ``InvalidArgument``; every message
names the spec field and the rule. This module imports no worker code (the scheduler uses it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from ps.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from ps.limits import SYNTHETIC_DEFAULTS

#: environment variables the settings come from (a flag of the same meaning overrides them)
ENV_ROOTS = "PS_DATA_ROOTS"
ENV_PROTOCOLS = "PS_DATA_PROTOCOLS"

#: fsspec protocols that are the local file system: allowed by local roots, never by ``protocols``
LOCAL_PROTOCOLS = ("file", "local")
#: protocols whose files name further locations (kerchunk references) the policy cannot check
INDIRECT_PROTOCOLS = ("reference",)

# -- synthetic: bounds -------------------------------------------------------------------------
# ps.worker.datasets.synthetic draws x (n x features float32), a teacher w (features x classes
# float32), the logits x @ w + b (n x classes float32, twice: the product and the sum), the
# labels (n int64, argmax then a copy) and the label-noise draw (n float64 plus n bools); a
# regression draws n x features plus a few length-n float32 vectors. All of it exists at once.
# ps.limits.max_synthetic_values (PS_MAX_SYNTHETIC_VALUES, 2**28 by default) is the configurable
# bound on n x features and features x classes; these are the ceiling no setting lifts, and they
# also bound n x classes, which the configurable one does not.

#: most rows (``n``) a synthetic: URI may ask for
SYNTHETIC_MAX_N = 1 << 31
#: most features (``features``)
SYNTHETIC_MAX_FEATURES = 1 << 24
#: most classes (``classes``, classification only)
SYNTHETIC_MAX_CLASSES = 1 << 16
#: most elements of any one generated array: n x features, n x classes, features x classes
SYNTHETIC_MAX_VALUES = 1 << 31
#: most bytes the generator holds at once, by ``synthetic_bytes``'s estimate
SYNTHETIC_MAX_BYTES = 8 << 30

_GLOB = "*?[]"
_PROTOCOL = re.compile(r"[a-z][a-z0-9+.\-_]*\Z")
_LONE_WORD = re.compile(r"[a-z]+\Z")  # fsspec reads a bare lowercase word in a chain as a protocol
_SHOWN = 300  # longest URI quoted in a message


def _show(uri: str) -> str:
    return uri if len(uri) <= _SHOWN else f"{uri[:_SHOWN]}... ({len(uri) - _SHOWN} more characters)"


def _split_values(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = values.split(",")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"expected strings, got {v!r}")
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _is_under(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it, by components (both normalised and absolute)."""
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _url_parts(protocol: str, rest: str) -> tuple[list[str] | None, str | None]:
    """The percent-decoded '/'-separated components of a URL's location (after ``protocol://``),
    or (None, why) when they cannot be compared safely."""
    if protocol in ("http", "https"):
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]  # the query and fragment name no location
    decoded = rest
    for _ in range(8):  # %252e%252e -> %2e%2e -> ..: decode as far as any server might
        previous, decoded = decoded, unquote(decoded)
        if decoded == previous:
            break
    else:
        return None, "is percent-encoded too deeply; name the location plainly"
    for text in (rest, decoded):
        if any(c in text for c in _GLOB):
            return None, f"has a glob character ('{next(c for c in text if c in _GLOB)}'); name one file"
    if "\\" in decoded or "\x00" in decoded:
        return None, "has a backslash or NUL; name the location plainly"
    parts = decoded.split("/")
    if parts and parts[-1] == "":
        parts = parts[:-1]  # a trailing slash
    for p in parts:
        if p in ("", ".", ".."):
            return None, f"has a '{p or '//'}' segment; name the location directly"
    return parts, None


@dataclass(frozen=True)
class _Link:
    """One link of a (possibly chained) fsspec URL, as fsspec reads it."""

    protocol: str   # "file" for the local file system
    path: str       # what follows the protocol (for a local link: the path fsspec opens)
    raw: str


def _links(uri: str) -> list[_Link]:
    """The links of ``uri``, outermost first, split as fsspec.core._un_chain does."""
    if "::" in uri:
        bits = []
        for p in uri.split("::"):
            bits.append(p + "://" if _LONE_WORD.match(p) else p)
    else:
        bits = [uri]
    links = []
    for bit in bits:
        protocol, path = None, bit
        if "://" in bit:
            head, tail = bit.split("://", 1)
            if len(head) > 1:  # fsspec: a one-letter "protocol" is a Windows drive
                protocol, path = head, tail
        if protocol is None and bit.startswith("data:"):
            protocol, path = "data", bit.split(":", 1)[1]
        if protocol is None or protocol in LOCAL_PROTOCOLS:
            # LocalFileSystem._strip_protocol: the first of these prefixes goes
            path = bit
            for prefix in ("file://", "file:", "local://", "local:"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            protocol = "file"
        links.append(_Link(protocol, path, bit))
    return links


def synthetic_sizes(uri: str) -> dict[str, list[int]]:
    """``n``, ``features`` and ``classes`` of a ``synthetic:KIND?...`` URI as the generator
    reads them (every occurrence of a repeated key is checked, the generator keeps the last;
    the defaults for what it leaves out). Raises InvalidArgument for a size that is not a whole
    number; other faults (unknown kind or key) are the generator's to report."""
    query = uri.partition(":")[2].partition("?")[2]
    sizes: dict[str, list[int]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in SYNTHETIC_DEFAULTS:
            try:  # exactly as ps.worker.datasets.open_uri converts it
                number = int(float(value)) if "e" in value.lower() else int(value)
            except (ValueError, OverflowError):
                raise InvalidArgument(f"synthetic parameter '{key}' must be a whole number, "
                                      f"got '{_show(value)[:40]}'") from None
            sizes.setdefault(key, []).append(number)
    return {k: sizes.get(k, [v]) for k, v in SYNTHETIC_DEFAULTS.items()}


def synthetic_bytes(kind: str, n: int, features: int, classes: int) -> int:
    """Estimated peak bytes of ``synthetic:KIND`` with these sizes (see the bounds above)."""
    if kind == "regression":
        return 4 * n * features + 4 * features + 32 * n
    return 4 * n * features + 4 * features * classes + 8 * n * classes + 32 * n


def check_synthetic(uri: str, field: str = "data.uri") -> None:
    """A ``synthetic:`` URI's sizes within the SYNTHETIC_MAX_* bounds (any policy)."""
    kind = uri.partition(":")[2].partition("?")[0]
    try:
        sizes = synthetic_sizes(uri)
    except InvalidArgument as e:
        raise InvalidArgument(f"spec field '{field}': {e}") from None
    regression = kind == "regression"  # any other kind is bounded as a classification
    bounds = (("n", SYNTHETIC_MAX_N, "SYNTHETIC_MAX_N"), ("features", SYNTHETIC_MAX_FEATURES, "SYNTHETIC_MAX_FEATURES"),
              ("classes", SYNTHETIC_MAX_CLASSES, "SYNTHETIC_MAX_CLASSES"))

    def over(what: str, value: int, limit: int, name: str) -> ResourceExhausted:
        return ResourceExhausted(f"spec field '{field}': synthetic {what} = {value} exceeds the limit {limit} "
                                 f"({name} in ps.data_policy: a generator holds all of its data at once)")
    for key, limit, name in bounds:
        if key == "classes" and regression:
            continue
        for value in sizes[key]:
            if value > limit:
                raise over(f"parameter '{key}'", value, limit, name)
    # negative or zero sizes are the generator's to refuse (before it draws anything): bound them at 1
    n, f = max(1, sizes["n"][-1]), max(1, sizes["features"][-1])
    c = 0 if regression else max(1, sizes["classes"][-1])
    for what, value in (("n x features", n * f), ("n x classes", n * c), ("features x classes", f * c)):
        if value > SYNTHETIC_MAX_VALUES:
            raise over(what, value, SYNTHETIC_MAX_VALUES, "SYNTHETIC_MAX_VALUES")
    size = synthetic_bytes(kind, n, f, c)
    if size > SYNTHETIC_MAX_BYTES:
        raise over("size (estimated bytes)", size, SYNTHETIC_MAX_BYTES, "SYNTHETIC_MAX_BYTES")


def _idx_format(uri: str, fmt: str | None) -> bool:
    """Whether ps.worker.data.read_dataset reads ``uri`` as IDX (so its label is a file's URI);
    the same rule as ps.worker.data.infer_format for IDX."""
    if fmt:
        return fmt.lower() == "idx"
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("gz", "bz2", "xz", "zst", "lz4"):
        parts = parts[:-1]
    if "-idx" in parts[-1] and parts[-1].endswith("-ubyte"):
        return True
    return len(parts) > 1 and parts[-1].startswith("idx")


def spec_data_uris(spec) -> list[tuple[str, str]]:
    """(field, URI) for every location a worker reads for ``spec`` (a ps.spec.JobSpec): the data
    and, for IDX data, its labels file (named by ``data.label`` or guessed from ``data.uri``).
    Checkpoint locations are not data: they are not listed."""
    d = spec.data
    uri = str(d.uri)
    out = [("data.uri", uri)]
    if uri.startswith(("builtin:", "synthetic:")):
        return out
    if _idx_format(uri, d.format):
        if d.label is not None and not isinstance(d.label, bool):
            out.append(("data.label", str(d.label)))
        elif d.label is None and "images-idx3" in uri:
            out.append(("data.uri", uri.replace("images-idx3", "labels-idx1")))  # the guessed labels file
    return out


@dataclass(frozen=True)
class DataPolicy:
    """The locations a job's data may be read from. ``roots``: absolute local paths (normalised
    with os.path.realpath) and URL prefixes (``s3://bucket/train``, stored without a trailing
    slash); ``protocols``: fsspec protocols allowed anywhere (``s3``, ``gs``). Neither: no
    restriction (``unrestricted``)."""

    roots: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()

    def __post_init__(self):
        roots, protocols = [], []
        for root in _split_values(self.roots):
            root = _normalise_root(root)
            if root not in roots:
                roots.append(root)
        for p in _split_values(self.protocols):
            p = p.lower().removesuffix("://")
            if not _PROTOCOL.match(p):
                raise ValueError(f"data protocol '{p}' is not an fsspec protocol name (e.g. s3, gs, https)")
            if p in LOCAL_PROTOCOLS:
                raise ValueError(f"data protocol '{p}' is the local file system: allow local files with a data "
                                 f"root (--data-root / {ENV_ROOTS}, e.g. /data; '/' for all of them)")
            if p in INDIRECT_PROTOCOLS:
                raise ValueError(f"data protocol '{p}' reads the locations its reference file names, which the "
                                 f"data policy cannot check: it is never allowed")
            if p not in protocols:
                protocols.append(p)
        object.__setattr__(self, "roots", tuple(roots))
        object.__setattr__(self, "protocols", tuple(protocols))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, roots: Iterable[str] | str | None = None,
                    protocols: Iterable[str] | str | None = None) -> DataPolicy:
        """From lists or comma-separated strings (``"/data,/scratch"``, ``"s3,gs"``). A relative
        local root is a ValueError naming it."""
        return cls(tuple(_split_values(roots)), tuple(_split_values(protocols)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DataPolicy:
        """From PS_DATA_ROOTS and PS_DATA_PROTOCOLS (unset or empty: unrestricted)."""
        env = os.environ if environ is None else environ
        try:
            return cls.from_values(env.get(ENV_ROOTS), env.get(ENV_PROTOCOLS))
        except ValueError as e:
            raise ValueError(f"{ENV_ROOTS}={env.get(ENV_ROOTS, '')!r} {ENV_PROTOCOLS}="
                             f"{env.get(ENV_PROTOCOLS, '')!r}: {e}") from None

    # -- what it allows ----------------------------------------------------------------------------
    @property
    def unrestricted(self) -> bool:
        """No roots and no protocols configured: every location is allowed."""
        return not self.roots and not self.protocols

    @property
    def local_roots(self) -> tuple[str, ...]:
        return tuple(r for r in self.roots if r.startswith("/"))

    @property
    def url_roots(self) -> tuple[str, ...]:
        return tuple(r for r in self.roots if not r.startswith("/"))

    def _allowed(self) -> str:
        parts = []
        if self.local_roots or self.url_roots:
            parts.append(", ".join(self.roots))
        if self.protocols:
            parts.append("protocols " + ", ".join(self.protocols))
        return "; ".join(parts) or "nothing"

    def describe(self) -> str:
        """One line for logs and --help."""
        if self.unrestricted:
            return (f"data: unrestricted: any local path or fsspec URL (set --data-root / {ENV_ROOTS} or "
                    f"--data-protocols / {ENV_PROTOCOLS} to restrict); builtin: and synthetic: always")
        local = ", ".join(self.local_roots) or "none"
        urls = ", ".join(self.url_roots) or "none"
        protocols = ", ".join(self.protocols) or "none"
        return (f"data: local files under {local}; URLs under {urls}; any URL of the protocols {protocols}; "
                f"builtin: and synthetic: always (synthetic: at most {SYNTHETIC_MAX_VALUES} values an array, "
                f"{SYNTHETIC_MAX_BYTES >> 30} GiB in all)")

    # -- checks -------------------------------------------------------------------------------------
    def check(self, uri: str, field: str = "data.uri") -> None:
        """Raise PermissionDenied (ResourceExhausted / InvalidArgument for a synthetic: size)
        unless ``uri`` may be read; the message names ``field`` and the rule."""
        uri = os.fspath(uri) if isinstance(uri, os.PathLike) else uri
        if not isinstance(uri, str):
            raise InvalidArgument(f"spec field '{field}': expected a URI string, got {type(uri).__name__}")
        if uri.startswith("builtin:"):
            return
        if uri.startswith("synthetic:"):
            check_synthetic(uri, field)
            return
        if self.unrestricted:
            return
        if "\x00" in uri:
            raise PermissionDenied(f"spec field '{field}': the URI holds a NUL character")
        links = _links(uri)
        chain = f" (in the chained URL {_show(uri)})" if len(links) > 1 else ""
        for link in links:
            if link.protocol == "file":
                self._check_local(link, field, chain)
            else:
                self._check_url(link, field, chain)

    def _check_local(self, link: _Link, field: str, chain: str) -> None:
        path = link.path
        where = f"spec field '{field}': {_show(link.raw)}"
        if not self.local_roots:
            raise PermissionDenied(f"{where} is a local path{chain}, and no local data root is configured (allowed: "
                                   f"{self._allowed()}); the scheduler and workers read local files only under "
                                   f"--data-root")
        if not path.startswith("/"):
            raise PermissionDenied(f"{where} is a relative path{chain}; with --data-root set a data path must be "
                                   f"absolute (under {', '.join(self.local_roots)})")
        if any(c in path for c in _GLOB):
            raise PermissionDenied(f"{where} has a glob character ('{next(c for c in path if c in _GLOB)}')"
                                   f"{chain}; name one file")
        real = os.path.realpath(path)
        if any(_is_under(real, root) for root in self.local_roots):
            return
        how = "is outside" if os.path.normpath(path) == real else "resolves (through '..' or a symlink) to a path outside"
        raise PermissionDenied(f"{where} {how} the allowed data roots ({', '.join(self.local_roots)}){chain}; "
                               f"the scheduler and workers read only under --data-root")

    def _check_url(self, link: _Link, field: str, chain: str) -> None:
        protocol = link.protocol
        if protocol in INDIRECT_PROTOCOLS:
            raise PermissionDenied(f"spec field '{field}': protocol '{protocol}'{chain} is never allowed: it reads "
                                   f"the locations its reference file names, which the data policy cannot check")
        parts, why = _url_parts(protocol, link.path)
        if parts is None:
            raise PermissionDenied(f"spec field '{field}': {_show(link.raw)} {why}{chain}")
        if protocol in self.protocols:
            return
        roots = [r for r in self.url_roots if r.split("://", 1)[0] == protocol]
        if not roots:
            urls = f"; URLs under {', '.join(self.url_roots)}" if self.url_roots else ""
            raise PermissionDenied(f"spec field '{field}': protocol '{_show(protocol)}'{chain} is not allowed "
                                   f"(allowed: {', '.join(self.protocols) or 'none'}{urls}); see --data-protocols")
        for root in roots:
            rest = root.split("://", 1)[1]
            root_parts = rest.split("/") if rest else []
            if parts[:len(root_parts)] == root_parts:
                return
        raise PermissionDenied(f"spec field '{field}': {_show(link.raw)} is outside the allowed data roots "
                               f"({', '.join(roots)}){chain}; the scheduler and workers read {protocol} URLs only "
                               f"under --data-root")

    def check_spec(self, spec) -> None:
        """Check every location a ps.spec.JobSpec names to read data from (``spec_data_uris``);
        not its checkpoint fields."""
        for field, uri in spec_data_uris(spec):
            self.check(uri, field)


def _normalise_root(root: str) -> str:
    if "\x00" in root:
        raise ValueError("data root holds a NUL character")
    if "::" in root:
        raise ValueError(f"data root '{root}' is a chained URL: name one location (a path or a URL prefix)")
    links = _links(root)
    link = links[0]
    if link.protocol == "file":
        if not link.path.startswith("/"):
            raise ValueError(f"data root '{root}' is a relative path: give an absolute one (e.g. /data)")
        return os.path.realpath(link.path)
    protocol = link.protocol.lower()
    if not _PROTOCOL.match(protocol):
        raise ValueError(f"data root '{root}': '{protocol}' is not an fsspec protocol name")
    if protocol in INDIRECT_PROTOCOLS:
        raise ValueError(f"data root '{root}': protocol '{protocol}' is never allowed (its reference file names "
                         f"locations the data policy cannot check)")
    parts, why = _url_parts(protocol, link.path)
    if parts is None:
        raise ValueError(f"data root '{root}' {why}")
    return f"{protocol}://{'/'.join(parts)}"

"""Dataset readers: npz, CSV, LIBSVM/svmlight, IDX (MNIST), Parquet and labelled text (hashed
token ids, :mod:`ps.worker.text`), read through fsspec so any fsspec URL works (local paths,
``file://``, ``s3://``, ``memory://``); ``builtin:`` and ``synthetic:`` URIs go to
:mod:`ps.worker.datasets`. Plus a small per-process cache so a worker reads each dataset once.
"""

from __future__ import annotations

import csv
import io
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable

import fsspec
import numpy as np

from ps.data_policy import DataPolicy
from ps.spec import TEXT_DEFAULTS, text_options
from ps.worker.dataset import Dataset
from ps.worker.text import parse_lines, text_dataset

FORMATS = ("npz", "csv", "tsv", "libsvm", "svmlight", "idx", "parquet", "text")

_EXTENSIONS = {
    "npz": "npz", "csv": "csv", "tsv": "tsv", "libsvm": "libsvm", "svm": "libsvm",
    "svmlight": "svmlight", "idx": "idx", "parquet": "parquet", "pq": "parquet", "txt": "text",
}
_COMPRESSIONS = ("gz", "bz2", "xz", "zst", "lz4")

_POLICY: DataPolicy | None = None


def set_policy(policy: DataPolicy | None) -> None:
    """Set this process's data policy (a worker does so once, from its settings); None: read
    PS_DATA_ROOTS / PS_DATA_PROTOCOLS at each read (unset: unrestricted). Forgets cached data,
    which was read under the old policy."""
    global _POLICY
    _POLICY = policy
    clear_cache()


def get_policy() -> DataPolicy:
    """The policy set with ``set_policy``, else the one PS_DATA_ROOTS / PS_DATA_PROTOCOLS give."""
    return _POLICY if _POLICY is not None else DataPolicy.from_env()


def read_dataset(uri: str, format: str | None = None, *, label: str | int | None = None,
                 features: list | None = None, n_features: int | None = None,
                 zero_based: bool = False, text: dict | None = None, policy: DataPolicy | None = None) -> Dataset:
    """Read a dataset from ``uri``; ``format`` is inferred from the extension when None.

    ``label``: CSV/Parquet label column (name or index, default the last column), npz key of the
    labels (default ``"y"``), or the URI of the IDX labels file. ``features``: the columns (or npz
    keys, default ``["x"]``) that form ``x``. ``n_features``/``zero_based``: LIBSVM width and
    index base (1-based by default). ``policy``: where data may be read from (default
    ``get_policy()``); a location outside it raises ps.errors.PermissionDenied before anything
    is opened (a synthetic: size over its bound, ResourceExhausted).

    ``text``: spec.data.text options (``column``, ``ngrams``, ``hash_bits``, ``max_tokens``) for
    labelled text, which ``read_text`` turns into int64 (n, L) hashed token ids
    padded with -1. Text is read when the format is ``text`` (inferred from ``.txt``), or when
    ``text`` is given (even ``{}``) and the format, given or inferred, is csv, tsv or parquet
    (or the file name tells none); other formats refuse ``text``. Without ``column`` a text
    file holds one ``label<TAB>text`` a line (``.tsv`` included); with it, a table's column
    ``column`` holds the text and ``label`` names the label column. A text ``builtin:`` dataset
    (``builtin:fortunes``) applies ``text`` too.
    """
    uri = str(uri)
    policy = get_policy() if policy is None else policy
    policy.check(uri, "data.uri")
    if uri.startswith(("builtin:", "synthetic:")):
        from ps.worker.datasets import open_uri
        return open_uri(uri, text=text)
    if format or text is None:
        fmt = (format or infer_format(uri)).lower()
    else:  # text options: the extension may still say csv, tsv or parquet (a table's text column)
        try:
            fmt = infer_format(uri)
        except ValueError:
            fmt = "text"
    if fmt == "text" or (text is not None and fmt in ("csv", "tsv", "parquet")):
        table = fmt if fmt != "text" else None
        return read_text(uri, label=label, table=table, policy=policy, **text_options(text, "data.text"))
    if text is not None:
        raise ValueError(f"{uri}: text options apply to text data (format text, csv, tsv or parquet), "
                         f"not to format '{fmt}'")
    if fmt == "npz":
        return _read_npz(uri, label, features)
    if fmt in ("csv", "tsv"):
        return _read_csv(uri, label, features, delimiter="\t" if fmt == "tsv" else ",")
    if fmt in ("libsvm", "svmlight"):
        return _read_libsvm(uri, n_features, zero_based)
    if fmt == "idx":
        return _read_idx(uri, label, policy)
    if fmt == "parquet":
        return _read_parquet(uri, label, features)
    raise ValueError(f"{uri}: unknown data format '{fmt}' (known: {', '.join(FORMATS)})")


def infer_format(uri: str) -> str:
    """The format named by a URI's extension (a compression suffix such as ``.gz`` is skipped)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in _COMPRESSIONS:
        parts = parts[:-1]
    if "-idx" in parts[-1] and parts[-1].endswith("-ubyte"):   # MNIST's train-images-idx3-ubyte
        return "idx"
    ext = parts[-1] if len(parts) > 1 else ""
    if ext.startswith("idx"):                                   # .idx, .idx1, .idx3-ubyte
        return "idx"
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise ValueError(f"{uri}: cannot tell the data format from the file name; pass format= one of "
                     f"{', '.join(FORMATS)}")


def validate_labels(y: np.ndarray, n_classes: int) -> None:
    """Raise ValueError naming the first label that is not a class id in [0, n_classes)."""
    y = np.asarray(y)
    bad = np.flatnonzero((y < 0) | (y >= n_classes) | (y != np.floor(y)))
    if bad.size:
        row = int(bad[0])
        value = y.reshape(-1)[row] if y.ndim == 1 else y[row]
        shown = f"{value:g}" if np.ndim(value) == 0 else str(value)
        raise ValueError(f"label {shown} at row {row} is outside [0, {n_classes})")


_CACHE: OrderedDict[str, Dataset] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def load_cached(source_key: str, loader: Callable[[], Dataset]) -> Dataset:
    """``loader()``'s result, kept in a per-process LRU of a few datasets keyed by ``source_key``
    (the spec's data section as JSON), so a worker reads each dataset once."""
    with _CACHE_LOCK:
        if source_key in _CACHE:
            _CACHE.move_to_end(source_key)
            return _CACHE[source_key]
        # Loading under the lock: two threads asking for the same data read it once.
        ds = loader()
        _CACHE[source_key] = ds
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return ds


def clear_cache() -> None:
    """Forget every cached dataset."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _read_bytes(uri: str, compression: str | None = "infer") -> bytes:
    try:
        with fsspec.open(uri, "rb", compression=compression) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such dataset file: {uri}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{uri}: is a directory, expected a file") from None
    except (OSError, EOFError) as e:
        if isinstance(e, EOFError) or "gzip" in str(e).lower() or "compress" in str(e).lower():
            raise ValueError(f"{uri}: could not decompress: {e}") from None
        raise


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer-valued labels become int64 class ids, anything else float32 targets."""
    y = np.asarray(y)
    if y.dtype.kind in "bui":
        return y.astype(np.int64)
    y = y.astype(np.float64)
    if y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)) and y.ndim == 1:
        return y.astype(np.int64)
    return y.astype(np.float32)


def _read_npz(uri: str, label, features) -> Dataset:
    raw = _read_bytes(uri)
    try:
        z = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{uri}: not a valid .npz file ({e})") from None
    keys = list(features) if features else ["x"]
    ykey = "y" if label is None else str(label)
    with z:
        for k in [*keys, ykey]:
            if k not in z.files:
                raise ValueError(f"{uri}: no array named '{k}' (arrays: {', '.join(z.files) or 'none'})")
        try:
            xs = [z[k] for k in keys]
            y = z[ykey]
        except ValueError as e:  # object arrays need pickle, which we never allow
            raise ValueError(f"{uri}: {e}") from None
    n = len(y)
    for k, a in zip(keys, xs):
        if a.ndim == 0 or len(a) != n:
            raise ValueError(f"{uri}: array '{k}' has shape {a.shape}, but '{ykey}' has {n} rows")
        if a.dtype.kind not in "buif":
            raise ValueError(f"{uri}: array '{k}' has dtype {a.dtype}, expected numbers")
    x = xs[0] if len(xs) == 1 else np.concatenate([a.reshape(n, -1) for a in xs], axis=1)
    if x.ndim == 1:
        x = x.reshape(n, 1)
    return Dataset(x.astype(np.float32), _labels(y), None)


def _column(header: list[str], spec, uri: str, what: str) -> int:
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        i = int(spec)
        if not -len(header) <= i < len(header):
            raise ValueError(f"{uri}: {what} column index {i} is out of range ({len(header)} columns)")
        return i % len(header)
    if spec in header:
        return header.index(spec)
    raise ValueError(f"{uri}: no {what} column '{spec}' (columns: {', '.join(header)})")


def _csv_rows(uri: str, delimiter: str = ",") -> tuple[list[str], list[list[str]], list[int]]:
    """A CSV/TSV file's header, its data rows (cells as text) and each row's line number."""
    raw = _read_bytes(uri)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri}: not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header, rows, lines = None, [], []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                continue
            if len(row) != len(header):
                raise ValueError(f"{uri} line {reader.line_num}: expected {len(header)} columns, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise ValueError(f"{uri} line {reader.line_num}: {e}") from None
    if header is None:
        raise ValueError(f"{uri}: empty file, expected a header row")
    if not rows:
        raise ValueError(f"{uri}: a header but no data rows")
    return header, rows, lines


def _numbers(cells, lines: list[int], uri: str, name: str) -> np.ndarray:
    """Text cells as float64; the first that is not a number is named with its line."""
    col = np.asarray(cells, dtype=object)
    try:
        return col.astype(np.float64)
    except ValueError:
        pass
    for r, cell in enumerate(col):  # find the culprit to name it
        try:
            float(cell)
        except ValueError:
            raise ValueError(f"{uri} line {lines[r]}: could not parse '{cell}' in column '{name}' "
                             f"as a number") from None
    raise AssertionError("unreachable")


def _label_values(cells, lines: list[int], uri: str, name: str) -> tuple[np.ndarray, list[str] | None]:
    """Labels read as text: (y, classes). Numbers are ``_labels``' (class ids or targets,
    classes None); text is class names, y indexing them sorted."""
    col = np.asarray(cells, dtype=object)
    try:
        return _labels(col.astype(np.float64)), None
    except ValueError:
        pass
    if any(_is_number(c) for c in col):  # a few text cells among numbers: a typo, not class names
        _numbers(col, lines, uri, name)
    classes = sorted({c.strip() for c in col})
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[c.strip()] for c in col], dtype=np.int64), classes


def _read_csv(uri: str, label, features, delimiter: str = ",") -> Dataset:
    header, rows, lines = _csv_rows(uri, delimiter)
    li = _column(header, -1 if label is None else label, uri, "label")
    if features is None:
        fi = [i for i in range(len(header)) if i != li]
    else:
        fi = [_column(header, f, uri, "feature") for f in features]
    if not fi:
        raise ValueError(f"{uri}: no feature columns besides the label '{header[li]}'")
    table = np.array(rows, dtype=object)
    x = np.stack([_numbers(table[:, j], lines, uri, header[j]) for j in fi], axis=1).astype(np.float32)
    y, classes = _label_values(table[:, li], lines, uri, header[li])
    return Dataset(x, y, [header[j] for j in fi], classes)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_libsvm(uri: str, n_features: int | None, zero_based: bool) -> Dataset:
    text = _read_bytes(uri).decode("utf-8", errors="replace")
    labels, indices, values, indptr = [], [], [], [0]
    base = 0 if zero_based else 1
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        try:
            labels.append(float(tokens[0]))
        except ValueError:
            raise ValueError(f"{uri} line {lineno}: could not parse the label '{tokens[0]}' as a number") from None
        for tok in tokens[1:]:
            key, sep, val = tok.partition(":")
            if key == "qid":
                continue
            try:
                i, v = int(key), float(val)
                if not sep:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{uri} line {lineno}: could not parse '{tok}' as index:value") from None
            if i < base:
                hint = "" if zero_based else " (indices are 1-based; pass zero_based=True for 0-based files)"
                raise ValueError(f"{uri} line {lineno}: feature index {i} is below {base}{hint}")
            indices.append(i - base)
            values.append(v)
        indptr.append(len(indices))
    if not labels:
        raise ValueError(f"{uri}: no examples")
    idx = np.asarray(indices, dtype=np.int64)
    val = np.asarray(values, dtype=np.float32)
    ptr = np.asarray(indptr, dtype=np.int64)
    width = int(idx.max()) + 1 if idx.size else 0
    if n_features is not None:
        if n_features < width:
            raise ValueError(f"{uri}: feature index {width - 1 + base} does not fit n_features={n_features}")
        width = int(n_features)
    x = np.zeros((len(labels), width), dtype=np.float32)
    rows = np.repeat(np.arange(len(labels)), np.diff(ptr))
    x[rows, idx] = val
    return Dataset(x, _labels(np.asarray(labels)), None, sparse=(val, idx, ptr))


# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(uri: str, *, policy: DataPolicy | None = None, field: str = "data.uri") -> np.ndarray:
    """One IDX file (MNIST's format, optionally gzip-compressed) as an array; ``policy`` and
    ``field`` as for ``read_dataset`` (the spec field that names the file)."""
    (get_policy() if policy is None else policy).check(uri, field)
    raw = _read_bytes(uri)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{uri}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{uri}: unknown IDX type code 0x{code:02X}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{uri}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    want = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != want:
        raise ValueError(f"{uri}: IDX header says {dims} ({want} bytes of data), the file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _read_idx(uri: str, label, policy: DataPolicy) -> Dataset:
    label_field = "data.label"
    if label is None:
        guess = uri.replace("images-idx3", "labels-idx1")
        if guess == uri:
            raise ValueError(f"{uri}: IDX examples need a labels file: pass label='URI of the labels file'")
        label, label_field = guess, "data.uri"  # the labels file guessed from it
    policy.check(str(label), label_field)  # before reading either file
    x = read_idx(uri, policy=policy)
    y = read_idx(str(label), policy=policy, field=label_field)
    if y.ndim != 1:
        raise ValueError(f"{label}: IDX labels must be 1-dimensional, got shape {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"{uri}: {len(x)} examples but {label} holds {len(y)} labels")
    # Flat features, like builtin:digits; a CNN reshapes with spec.data.reshape, e.g. [1, 28, 28].
    return Dataset(x.reshape(len(x), -1).astype(np.float32), _labels(y), None)


def _parquet_table(uri: str):
    """A Parquet file as a pyarrow Table, and its column names."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install paramserver[parquet]") from None
    raw = _read_bytes(uri, compression=None)
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except pa.ArrowException as e:
        raise ValueError(f"{uri}: not a valid Parquet file ({e})") from None
    header = list(table.column_names)
    if not header:
        raise ValueError(f"{uri}: no columns")
    return table, header


def _parquet_values(table, j: int, uri: str, want: str = "number") -> np.ndarray:
    """Column ``j`` as numpy: numbers (lists of one length become rows); ``want="label"``
    also takes strings, ``want="text"`` only strings."""
    import pyarrow as pa
    col = table.column(j)
    name = table.column_names[j]
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{uri} row {row}: missing value in column '{name}'")
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if want in ("label", "text"):
            return col.to_numpy(zero_copy_only=False).astype(str)
    elif want == "text":
        raise ValueError(f"{uri}: column '{name}' has type {t}, expected text (strings)")
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        cells = col.to_pylist()
        if len({len(c) for c in cells}) > 1:
            raise ValueError(f"{uri}: column '{name}' holds lists of different lengths")
        return np.asarray(cells, dtype=np.float64)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return col.to_numpy(zero_copy_only=False)
    raise ValueError(f"{uri}: column '{name}' has type {t}, expected numbers")


def _parquet_labels(yv: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """(y, classes) of a label column: strings are class names (y indexes them sorted)."""
    if yv.dtype.kind in "US":
        classes = sorted(set(yv.tolist()))
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[c] for c in yv.tolist()], dtype=np.int64), classes
    return _labels(yv), None


def _read_parquet(uri: str, label, features) -> Dataset:
    table, header = _parquet_table(uri)
    li = _column(header, -1 if label is None else label, uri, "label")
    fi = [i for i in range(len(header)) if i != li] if features is None else \
        [_column(header, f, uri, "feature") for f in features]
    if not fi:
        raise ValueError(f"{uri}: no feature columns besides the label '{header[li]}'")
    n = table.num_rows
    x = np.concatenate([_parquet_values(table, j, uri).reshape(n, -1) for j in fi], axis=1).astype(np.float32)
    y, classes = _parquet_labels(_parquet_values(table, li, uri, want="label"))
    return Dataset(x, y, [header[j] for j in fi], classes)


def read_text(uri: str, *, column: str | int | None = None, label: str | int | None = None,
              ngrams: int = TEXT_DEFAULTS["ngrams"], hash_bits: int = TEXT_DEFAULTS["hash_bits"],
              max_tokens: int = TEXT_DEFAULTS["max_tokens"], table: str | None = None, policy=None) -> Dataset:
    """Labelled text at ``uri`` (any fsspec URL; ``.gz`` and the like decompressed) as a Dataset:
    x int64 (n, L) hashed ids (``ps.worker.text.encode``), y the labels, ``classes`` their names.

    ``column`` None: the lines layout, ``label<TAB>text`` a line. ``column`` given: a table with
    a header row (CSV, TSV or Parquet: ``table``, else the file name's extension, else CSV) whose
    column ``column`` (name or index) holds the text and ``label`` the label (default: the last
    column, or the first when the last is the text). Labels that are all whole numbers are the
    class ids themselves (``classes`` None), other numbers float32 targets, anything else class
    names: y indexes ``classes``, sorted. ``ngrams``/``hash_bits``/``max_tokens``: as
    spec.data.text (``ps.spec.TEXT_DEFAULTS``). ``policy``: as ``read_dataset``.
    """
    options = text_options({"column": column, "ngrams": ngrams, "hash_bits": hash_bits, "max_tokens": max_tokens},
                           "text")
    (get_policy() if policy is None else policy).check(uri, "data.uri")
    if column is None:
        if label is not None:
            raise ValueError(f"{uri}: label={label!r} names a table's label column, and there is no table: "
                             f"without a text column (data.text.column) each line is 'label<TAB>text'")
        raw = _read_bytes(uri)
        try:
            body = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{uri}: not UTF-8 text ({e})") from None
        labels, texts, lines = parse_lines(body, uri)
        y, classes = _label_values(labels, lines, uri, "label")
        return text_dataset(texts, y, classes, options)
    kind = (table or _text_table_kind(uri)).lower()
    if kind == "parquet":
        tab, header = _parquet_table(uri)
        ti = _column(header, column, uri, "text")
        li = _text_label_index(header, label, ti, uri)
        texts = _parquet_values(tab, ti, uri, want="text").tolist()
        yv = _parquet_values(tab, li, uri, want="label")
        y, classes = _parquet_labels(yv)
        return text_dataset(texts, y, classes, options)
    if kind not in ("csv", "tsv"):
        raise ValueError(f"{uri}: a text column is read from csv, tsv or parquet tables, not '{kind}'")
    header, rows, lines = _csv_rows(uri, "\t" if kind == "tsv" else ",")
    ti = _column(header, column, uri, "text")
    li = _text_label_index(header, label, ti, uri)
    y, classes = _label_values([r[li] for r in rows], lines, uri, header[li])
    return text_dataset([r[ti] for r in rows], y, classes, options)


def _text_table_kind(uri: str) -> str:
    try:
        kind = infer_format(uri)
    except ValueError:
        return "csv"
    return kind if kind in ("csv", "tsv", "parquet") else "csv"


def _text_label_index(header: list[str], label, text_index: int, uri: str) -> int:
    if label is None:
        li = len(header) - 1 if text_index != len(header) - 1 else 0
    else:
        li = _column(header, label, uri, "label")
    if li == text_index:
        raise ValueError(f"{uri}: the label column '{header[li]}' is the text column; name another with label=")
    return li

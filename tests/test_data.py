"""Data readers, built-in datasets, preprocessing and sharding (ps.worker.data / datasets / preprocess)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from importlib import resources

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps.worker.data import Dataset, clear_cache, infer_format, load_cached, read_dataset, validate_labels
from ps.worker.datasets import load_builtin, synthetic
from ps.worker.preprocess import Scaler, batches, one_hot, shard_ranges, train_test_split


from conftest import put


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file by hand: two zero bytes, the type code, ndim, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


# --- npz -------------------------------------------------------------------------------------

def test_npz_reader_returns_float32_features_and_int64_labels(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1, 2], dtype=np.uint8))
    ds = read_dataset(str(tmp_path / "d.npz"))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, [0, 1, 1, 2])
    assert len(ds) == 4


def test_npz_reader_takes_other_array_names_and_reads_memory_urls(mem):
    buf = io.BytesIO()
    np.savez(buf, pixels=np.ones((3, 2, 2)), target=np.array([0.5, 1.5, 2.5]))
    uri = put(mem("d.npz"), buf.getvalue())
    ds = read_dataset(uri, features=["pixels"], label="target")
    assert ds.x.shape == (3, 2, 2)
    assert ds.y.dtype == np.float32
    np.testing.assert_allclose(ds.y, [0.5, 1.5, 2.5])


def test_npz_reader_names_the_missing_array(mem):
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((2, 2)))
    uri = put(mem("d.npz"), buf.getvalue())
    with pytest.raises(ValueError, match=r"d\.npz: no array named 'y' \(arrays: x\)"):
        read_dataset(uri)


# --- CSV -------------------------------------------------------------------------------------

CSV = "sepal,petal,kind,width\n1.0,2.0,1,0.5\n3.0,4.0,0,1.5\n5.5,-6.0,2,2.5\n"


def test_csv_reader_uses_the_named_label_column_and_keeps_the_other_names(tmp_path):
    (tmp_path / "d.csv").write_text(CSV)
    ds = read_dataset(str(tmp_path / "d.csv"), label="kind")
    assert ds.feature_names == ["sepal", "petal", "width"]
    np.testing.assert_array_equal(ds.x, [[1, 2, 0.5], [3, 4, 1.5], [5.5, -6, 2.5]])
    np.testing.assert_array_equal(ds.y, [1, 0, 2])
    assert ds.y.dtype == np.int64


def test_csv_reader_defaults_to_the_last_column_and_takes_an_index(mem):
    uri = put(mem("d.csv"), CSV)
    last = read_dataset(uri)
    np.testing.assert_allclose(last.y, [0.5, 1.5, 2.5])
    assert last.y.dtype == np.float32 and last.feature_names == ["sepal", "petal", "kind"]
    by_index = read_dataset(uri, label=2, features=["petal", "sepal"])
    np.testing.assert_array_equal(by_index.y, [1, 0, 2])
    np.testing.assert_array_equal(by_index.x[:, 0], [2, 4, -6])


def test_csv_labels_given_as_text_become_sorted_class_ids(mem):
    uri = put(mem("iris.csv"), "a,b,species\n1,2,virginica\n3,4,setosa\n5,6,virginica\n")
    ds = read_dataset(uri, format="csv")
    assert ds.classes == ["setosa", "virginica"]
    np.testing.assert_array_equal(ds.y, [1, 0, 1])


def test_csv_cell_that_is_not_a_number_is_named_by_file_line_and_column(mem):
    uri = put(mem("data.csv"), "x1,x2,x3,y\n1,2,3,0\n4,5,abc,1\n")
    with pytest.raises(ValueError) as e:
        read_dataset(uri)
    assert str(e.value) == f"{uri} line 3: could not parse 'abc' in column 'x3' as a number"


def test_csv_row_with_a_missing_column_is_reported_with_its_line(mem):
    uri = put(mem("data.csv"), "a,b,y\n1,2,0\n\n3,1\n")
    with pytest.raises(ValueError, match=r"data\.csv line 4: expected 3 columns, got 2"):
        read_dataset(uri)


def test_csv_unknown_label_column_lists_the_columns(mem):
    uri = put(mem("data.csv"), CSV)
    with pytest.raises(ValueError, match=r"no label column 'species' \(columns: sepal, petal, kind, width\)"):
        read_dataset(uri, label="species")


def test_gzipped_csv_is_decompressed_transparently(tmp_path):
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(CSV.encode()))
    ds = read_dataset(str(tmp_path / "d.csv.gz"), label="kind")
    np.testing.assert_array_equal(ds.y, [1, 0, 2])


# --- LIBSVM ----------------------------------------------------------------------------------

LIBSVM = """# a comment line
1 1:0.5 3:2
0 2:-1.5   # trailing comment
1 qid:7 4:3.25
0
"""


def test_libsvm_reader_densifies_one_based_rows_and_infers_the_width(mem):
    uri = put(mem("d.libsvm"), LIBSVM)
    ds = read_dataset(uri)
    np.testing.assert_array_equal(ds.x, [[0.5, 0, 2, 0], [0, -1.5, 0, 0], [0, 0, 0, 3.25], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ds.y, [1, 0, 1, 0])
    data, indices, indptr = ds.sparse
    np.testing.assert_array_equal(indptr, [0, 2, 3, 4, 4])
    np.testing.assert_array_equal(indices, [0, 2, 1, 3])
    np.testing.assert_array_equal(data, [0.5, 2, -1.5, 3.25])


def test_libsvm_reader_pads_to_the_given_feature_count_and_rejects_a_smaller_one(tmp_path):
    (tmp_path / "d.svm").write_text(LIBSVM)
    assert read_dataset(str(tmp_path / "d.svm"), n_features=6).x.shape == (4, 6)
    with pytest.raises(ValueError, match="feature index 4 does not fit n_features=3"):
        read_dataset(str(tmp_path / "d.svm"), n_features=3)


def test_libsvm_index_zero_in_a_one_based_file_suggests_zero_based(mem):
    uri = put(mem("d.svmlight"), "1 0:1 1:2\n")
    with pytest.raises(ValueError, match=r"line 1: feature index 0 is below 1 .*zero_based=True"):
        read_dataset(uri)
    np.testing.assert_array_equal(read_dataset(uri, zero_based=True).x, [[1, 2]])


# --- IDX -------------------------------------------------------------------------------------

def test_gzipped_idx_images_and_labels_are_read_through_fsspec(mem):
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4) * 10
    labels = np.array([7, 0, 9], dtype=np.uint8)
    x_uri = put(mem("images.idx3.gz"), gzip.compress(idx_bytes(images, 0x08)))
    y_uri = put(mem("labels.idx1.gz"), gzip.compress(idx_bytes(labels, 0x08)))
    ds = read_dataset(x_uri, label=y_uri)
    assert ds.x.shape == (3, 8) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x, images.reshape(3, 8))
    np.testing.assert_array_equal(ds.y, [7, 0, 9])


def test_mnist_style_idx_names_find_their_labels_file(tmp_path):
    images = np.array([[[1.5, -2.0]], [[0.25, 4.0]]], dtype=np.float32)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x0D))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([3, 1]), 0x0B))
    ds = read_dataset(f"file://{tmp_path}/train-images-idx3-ubyte")
    np.testing.assert_array_equal(ds.x, [[1.5, -2.0], [0.25, 4.0]])
    np.testing.assert_array_equal(ds.y, [3, 1])


def test_idx_file_shorter_than_its_header_says_is_an_error(mem):
    uri = put(mem("x.idx"), idx_bytes(np.zeros((2, 3), np.uint8), 0x08)[:-1])
    y_uri = put(mem("y.idx"), idx_bytes(np.zeros(2, np.uint8), 0x08))
    with pytest.raises(ValueError, match=r"x\.idx: IDX header says \(2, 3\) \(6 bytes of data\), the file holds 5"):
        read_dataset(uri, label=y_uri)


# --- Parquet ---------------------------------------------------------------------------------

def test_parquet_reader_uses_the_label_column_by_name(mem):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"f0": [1.0, 2.0, 3.0], "f1": [10, 20, 30], "label": [2, 0, 1], "w": [0.1, 0.2, 0.3]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = put(mem("d.parquet"), buf.getvalue())
    ds = read_dataset(uri, label="label")
    assert ds.feature_names == ["f0", "f1", "w"]
    np.testing.assert_allclose(ds.x, [[1, 10, 0.1], [2, 20, 0.2], [3, 30, 0.3]], rtol=1e-6)
    np.testing.assert_array_equal(ds.y, [2, 0, 1])


def test_parquet_missing_value_is_named_by_row_and_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"a": [1.0, None], "y": [0, 1]}), tmp_path / "d.pq")
    with pytest.raises(ValueError, match=r"d\.pq row 1: missing value in column 'a'"):
        read_dataset(str(tmp_path / "d.pq"))


# --- errors, formats, labels, cache ----------------------------------------------------------

def test_missing_file_error_names_the_uri(tmp_path):
    uri = str(tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError) as e:
        read_dataset(uri)
    assert str(e.value) == f"no such dataset file: {uri}"


def test_missing_memory_file_error_names_the_uri(mem):
    with pytest.raises(FileNotFoundError, match="no such dataset file: memory://"):
        read_dataset(mem("absent.npz"))


def test_format_is_inferred_from_the_extension_past_a_compression_suffix():
    assert infer_format("s3://b/train.csv.gz") == "csv"
    assert infer_format("/d/x.libsvm") == "libsvm"
    assert infer_format("t10k-images-idx3-ubyte.gz") == "idx"
    assert infer_format("part-0.parquet") == "parquet"
    with pytest.raises(ValueError, match="cannot tell the data format .* pass format="):
        infer_format("/d/data.bin")


def test_out_of_range_label_is_named_with_its_row():
    y = np.zeros(50, dtype=np.int64)
    y[40] = 12
    with pytest.raises(ValueError) as e:
        validate_labels(y, 10)
    assert str(e.value) == "label 12 at row 40 is outside [0, 10)"
    validate_labels(np.arange(10), 10)


def test_cache_reads_each_dataset_once_and_forgets_the_least_recently_used():
    clear_cache()
    calls = []

    def loader(name):
        def load():
            calls.append(name)
            return Dataset(np.zeros((1, 1), np.float32), np.zeros(1, np.int64))
        return load

    first = load_cached('{"uri": "a"}', loader("a"))
    assert load_cached('{"uri": "a"}', loader("a")) is first
    for name in "bcde":
        load_cached(name, loader(name))
    load_cached('{"uri": "a"}', loader("a"))
    assert calls == ["a", "b", "c", "d", "e", "a"]
    clear_cache()


# --- built-in and synthetic data -------------------------------------------------------------

def test_digits_are_scikit_learns_1797_images_with_its_class_counts():
    ds = load_builtin("digits")
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert np.bincount(ds.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # Checksums recorded from sklearn.datasets.load_digits() (scikit-learn 1.9.1).
    assert ds.x.astype(np.int64).sum() == 561718
    assert (ds.x.astype(np.int64) ** 2).sum() == 6907012
    assert ds.x[0].astype(int).tolist()[:16] == [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    assert ds.y[:10].tolist() == list(range(10))
    assert ds.x.min() == 0 and ds.x.max() == 16


def test_digits_as_images_and_through_a_builtin_uri():
    images = load_builtin("digits", image=True)
    assert images.x.shape == (1797, 1, 8, 8)
    flat = read_dataset("builtin:digits")
    np.testing.assert_array_equal(images.x.reshape(1797, 64), flat.x)
    assert read_dataset("builtin:digits?image=1").x.shape == (1797, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown built-in dataset 'mnist' \\(available: digits, fortunes\\)"):
        read_dataset("builtin:mnist")


def test_digits_file_is_small_and_carries_its_license():
    data = resources.files("ps.worker") / "data"
    assert len((data / "digits.npz").read_bytes()) < 100_000
    text = (data / "DIGITS_LICENSE.txt").read_text()
    assert "CC BY 4.0" in text and "Alpaydin" in text and "Kaynak" in text and "scikit-learn" in text


def test_synthetic_classification_is_deterministic_for_a_seed():
    uri = "synthetic:classification?n=500&features=7&classes=3&seed=4"
    a, b = read_dataset(uri), read_dataset(uri)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.x.shape == (500, 7) and a.x.dtype == np.float32 and a.y.dtype == np.int64
    assert set(np.unique(a.y)) == {0, 1, 2}
    other = read_dataset(uri.replace("seed=4", "seed=5"))
    assert not np.array_equal(a.x, other.x)


def test_synthetic_classification_is_learnable_by_a_linear_model():
    ds = synthetic("classification", n=4000, features=10, classes=2, seed=0)
    xb = np.hstack([ds.x, np.ones((len(ds.x), 1), np.float32)])
    w, *_ = np.linalg.lstsq(xb[:3000], 2.0 * ds.y[:3000] - 1, rcond=None)
    accuracy = ((xb[3000:] @ w > 0) == ds.y[3000:]).mean()
    assert accuracy > 0.9
    assert 0.2 < ds.y.mean() < 0.8


def test_synthetic_regression_is_a_linear_teacher_plus_the_requested_noise():
    exact = read_dataset("synthetic:regression?n=300&features=4&noise=0&seed=1")
    assert exact.y.dtype == np.float32
    xb = np.hstack([exact.x, np.ones((300, 1), np.float32)])
    _, residual, *_ = np.linalg.lstsq(xb, exact.y, rcond=None)
    assert residual[0] < 1e-8
    noisy = read_dataset("synthetic:regression?n=20000&features=4&noise=0.5&seed=1")
    xb = np.hstack([noisy.x, np.ones((20000, 1), np.float32)])
    w, *_ = np.linalg.lstsq(xb, noisy.y, rcond=None)
    assert np.std(noisy.y - xb @ w) == pytest.approx(0.5, rel=0.05)


def test_synthetic_uri_with_an_unknown_parameter_names_it():
    with pytest.raises(ValueError, match="unknown parameter 'rows'"):
        read_dataset("synthetic:classification?rows=10")


# --- preprocessing ---------------------------------------------------------------------------

def test_split_is_disjoint_covering_and_deterministic():
    train, test = train_test_split(1797, 0.3, seed=0)
    assert len(test) == 539 and len(train) == 1258
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    again = train_test_split(1797, 0.3, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(test, train_test_split(1797, 0.3, seed=1)[1])


def test_split_keeps_both_parts_non_empty_and_can_stratify():
    train, test = train_test_split(2, 0.01)
    assert len(train) == 1 and len(test) == 1
    y = np.repeat([0, 1, 2], [100, 50, 10])
    train, test = train_test_split(len(y), 0.3, seed=3, stratify=y)
    assert np.bincount(y[test]).tolist() == [30, 15, 3]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        train_test_split(10, 1.5)


def test_standard_scaler_statistics_come_from_the_training_split_only():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 4)).astype(np.float32)
    x[:, 3] = 7.0  # a constant feature
    train, test = train_test_split(len(x), 0.3, seed=0)
    x[test] += 100.0  # a shifted test split must not move the statistics
    scaler = Scaler("standard").fit(x[train])
    stats = scaler.to_dict()
    np.testing.assert_allclose(stats["mean"], x[train].astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"][:3], x[train, :3].astype(np.float64).std(axis=0), rtol=1e-12)
    assert stats["std"][3] == 1.0
    z = scaler.transform(x[train])
    assert z.dtype == np.float32 and np.all(np.isfinite(z))
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1, atol=1e-5)
    np.testing.assert_array_equal(z[:, 3], 0)


def test_scaler_round_trips_through_json():
    x = np.array([[0.0, 5.0], [10.0, 5.0], [4.0, 5.0]], np.float32)
    for kind in ("standard", "minmax", "none"):
        scaler = Scaler(kind).fit(x)
        restored = Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
        np.testing.assert_array_equal(restored.transform(x), scaler.transform(x))
    np.testing.assert_allclose(Scaler("minmax").fit_transform(x), [[0, 0], [1, 0], [0.4, 0]])
    np.testing.assert_array_equal(Scaler("none").fit_transform(x), x)
    with pytest.raises(ValueError, match="unknown scaling 'zscore'"):
        Scaler("zscore")


def test_one_hot_sets_one_column_per_row_and_checks_the_range():
    np.testing.assert_array_equal(one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"label 3 at row 1 is outside \[0, 3\)"):
        one_hot(np.array([0, 3]), 3)


@given(n=st.integers(0, 100_000), k=st.integers(1, 300))
def test_shard_ranges_cover_every_example_once_in_near_equal_parts(n, k):
    ranges = shard_ranges(n, k)
    assert len(ranges) == k
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


def test_batches_shuffle_each_epoch_the_same_way_for_a_seed():
    epoch0 = list(batches(10, 4, seed=1, epoch=0))
    assert [len(b) for b in epoch0] == [4, 4, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch0)), np.arange(10))
    again = list(batches(10, 4, seed=1, epoch=0))
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again))
    epoch1 = np.concatenate(list(batches(10, 4, seed=1, epoch=1)))
    assert not np.array_equal(np.concatenate(epoch0), epoch1)
    assert [len(b) for b in batches(10, 4, seed=1, epoch=0, drop_last=True)] == [4, 4]

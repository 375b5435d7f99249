"""Text as hashed token ids (ps.worker.text, ps.worker.data.read_text), the bundled
builtin:fortunes corpus, the synthetic:ctr generator, and the spec fields and limits that go
with them."""

from __future__ import annotations

import gzip
import inspect
import time
from importlib import resources

import numpy as np
import pytest

from ps.limits import SYNTHETIC_CTR_DEFAULTS, Limits
from ps.spec import TEXT_DEFAULTS, JobSpec, SpecError
from ps.worker.data import infer_format, read_dataset, read_text
from ps.worker.datasets import ctr, load_builtin
from ps.worker.preprocess import train_test_split
from ps.worker.text import encode, hash_tokens, ngrams, parse_lines, token_hash, tokenize

D = Limits()


from conftest import put


def softmax_regression_accuracy(ids: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                                steps: int = 60, lr: float = 0.5) -> float:
    """Held-out accuracy of a bag-of-ids softmax regression (one weight row per id, -1 ignored),
    fitted with full-batch Adagrad in plain NumPy: the linear model an embedding layer with a
    sum and a dense layer can express."""
    k = int(y.max()) + 1
    mask = ids >= 0
    rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)[mask]
    vocab, cols = np.unique(ids[mask], return_inverse=True)  # compact the ids present
    part = np.full(len(ids), -1)  # 0: train, 1: test
    part[train], part[test] = 0, 1
    where = np.empty(len(ids), np.int64)  # a row's number within its part
    where[train], where[test] = np.arange(len(train)), np.arange(len(test))
    r_tr, c_tr = where[rows[part[rows] == 0]], cols[part[rows] == 0]
    r_te, c_te = where[rows[part[rows] == 1]], cols[part[rows] == 1]
    w = np.zeros((len(vocab), k))
    b = np.zeros(k)
    g2w, g2b = np.full_like(w, 1e-8), np.full_like(b, 1e-8)
    target = np.eye(k)[y[train]]

    def logits(r, c, n):
        return np.stack([np.bincount(r, weights=w[c, j], minlength=n) for j in range(k)], axis=1) + b
    for _ in range(steps):
        z = logits(r_tr, c_tr, len(train))
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - target) / len(train)
        gw = np.stack([np.bincount(c_tr, weights=g[r_tr, j], minlength=len(vocab)) for j in range(k)], axis=1)
        gb = g.sum(axis=0)
        g2w += gw ** 2
        g2b += gb ** 2
        w -= lr * gw / np.sqrt(g2w)
        b -= lr * gb / np.sqrt(g2b)
    return float((logits(r_te, c_te, len(test)).argmax(axis=1) == y[test]).mean())


def majority_accuracy(y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of always guessing the training split's most common class."""
    return float((y[test] == np.bincount(y[train]).argmax()).mean())


# --- tokens, n-grams, hashing ----------------------------------------------------------------

def test_tokenize_keeps_lower_case_words_with_inner_apostrophes():
    text = "Don't PANIC: it's 42_times \u2018quoted\u2019 Caf\u00e9!  ``Hi''  rock'n'roll o'clock -- x"
    assert tokenize(text) == ["don't", "panic", "it's", "42", "times", "quoted", "caf\u00e9", "hi",
                              "rock'n'roll", "o'clock", "x"]
    assert tokenize("don\u2019t") == ["don't"]  # the typographic apostrophe counts as '
    assert tokenize("  ...  ") == []


def test_ngrams_are_ordered_by_position_then_length():
    assert ngrams(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert ngrams(["a", "b", "c"], 2) == ["a", "a b", "b", "b c", "c"]
    assert ngrams(["a", "b", "c"], 3) == ["a", "a b", "a b c", "b", "b c", "c"]
    assert ngrams([], 2) == []
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        ngrams(["a"], 0)


def test_a_tokens_bucket_is_a_fixed_number_on_every_machine():
    # BLAKE2b-64 of b"hello" is a7b6eda801e5347d; read little-endian: 0x7d34e501a8edb6a7.
    assert token_hash("hello") == 0x7D34E501A8EDB6A7  # 9022087748821825191
    assert hash_tokens(["hello", "world", "hello world"], 20).tolist() == [898727, 209240, 231047]
    assert hash_tokens(["hello"], 30).tolist() == [686667431]
    assert hash_tokens(["hello"], 1).tolist() == [1]
    assert hash_tokens([], 20).dtype == np.int64


def test_encode_pads_with_minus_one_to_the_longest_row_and_keeps_repeats():
    x = encode(["a b a", "", "c d e f g"], bits=8, max_tokens=4)
    assert x.dtype == np.int64 and x.shape == (3, 4)  # min(max_tokens, longest)
    a, b = hash_tokens(["a", "b"], 8)
    assert x[0].tolist() == [a, b, a, -1]  # "a" twice
    assert x[1].tolist() == [-1, -1, -1, -1]  # no tokens
    assert x[2].tolist() == hash_tokens(["c", "d", "e", "f"], 8).tolist()  # cut at max_tokens
    assert encode(["one two"], bits=8).shape == (1, 2)
    assert encode(["", "..."]).shape == (2, 1)  # at least one column
    assert encode([]).shape == (0, 1)


def test_encode_with_bigrams_cut_at_max_tokens_keeps_a_prefix_of_the_text():
    x = encode(["the cat sat on the mat"], bits=20, ngram=2, max_tokens=4)
    assert x[0].tolist() == hash_tokens(["the", "the cat", "cat", "cat sat"], 20).tolist()
    assert encode(["the cat sat"], ngram=2)[0].tolist() == [776798, 904152, 862003, 206616, 198839]


def test_encode_refuses_options_out_of_range_naming_them():
    with pytest.raises(ValueError, match=r"^hash_bits: expected an integer in \[1, 30\], got 31$"):
        encode(["x"], bits=31)
    with pytest.raises(ValueError, match=r"^ngrams: expected an integer in \[1, 5\], got 0$"):
        encode(["x"], ngram=0)
    with pytest.raises(ValueError, match=r"^max_tokens: expected an integer in \[1, 65536\], got 0$"):
        encode(["x"], max_tokens=0)
    with pytest.raises(TypeError, match="example 1 is int, expected a string"):
        encode(["x", 3])


# --- reading text ----------------------------------------------------------------------------

TSV = "pos\tA great, fun movie\nneg\tdull and slow\n\npos\tgreat cast\tgreat music\n"


def test_lines_of_label_tab_text_read_as_ids_and_sorted_class_names(mem):
    uri = put(mem("reviews.txt"), TSV)
    assert infer_format(uri) == "text" and infer_format(mem("r.txt.gz")) == "text"
    ds = read_dataset(uri)
    assert ds.classes == ["neg", "pos"]
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(ds.x, encode(["A great, fun movie", "dull and slow", "great cast\tgreat music"]))
    assert ds.x.shape == (3, 4) and ds.feature_names is None


def test_a_tsv_with_text_options_is_read_as_lines_and_gzip_is_undone(mem):
    uri = put(mem("reviews.tsv.gz"), gzip.compress(TSV.encode()))
    ds = read_dataset(uri, text={"hash_bits": 4, "max_tokens": 2})
    assert ds.x.shape == (3, 2) and ds.x.max() < 16 and ds.classes == ["neg", "pos"]
    np.testing.assert_array_equal(ds.x, read_text(uri, hash_bits=4, max_tokens=2).x)
    np.testing.assert_array_equal(read_dataset(uri, "text").x, encode(["A great, fun movie", "dull and slow",
                                                                       "great cast\tgreat music"]))


def test_whole_number_labels_are_class_ids(mem):
    ds = read_dataset(put(mem("sst.txt"), "1\tgood\n0\tbad\n1\tfine\n"))
    assert ds.y.tolist() == [1, 0, 1] and ds.classes is None


def test_a_line_without_a_tab_names_its_line_number(mem):
    uri = put(mem("bad.txt"), "pos\tfine\n\nneg no tab here\n")
    with pytest.raises(ValueError, match=r"bad.txt line 3: expected 'label<TAB>text', found no TAB"):
        read_dataset(uri)
    with pytest.raises(ValueError, match="line 2: empty label before the TAB"):
        parse_lines("a\tx\n\tno label\n", "f")
    with pytest.raises(ValueError, match="f: no examples"):
        parse_lines("\n\n", "f")
    with pytest.raises(ValueError, match="label='stars' names a table's label column, and there is no table"):
        read_dataset(put(mem("ok.txt"), "pos\tfine\n"), label="stars")


def test_a_csv_text_column_with_a_label_column(mem):
    uri = put(mem("reviews.csv"), 'id,review,label\n1,"Great, fun!",pos\n2,"Dull, slow",neg\n3,great,pos\n')
    ds = read_dataset(uri, label="label", text={"column": "review", "ngrams": 2})
    assert ds.classes == ["neg", "pos"] and ds.y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(ds.x, encode(["Great, fun!", "Dull, slow", "great"], ngram=2))
    # the label defaults to the last column; the text column may be named by index
    np.testing.assert_array_equal(read_dataset(uri, text={"column": 1}).y, ds.y)
    with pytest.raises(ValueError, match="no text column 'body' \\(columns: id, review, label\\)"):
        read_dataset(uri, text={"column": "body"})
    with pytest.raises(ValueError, match="the label column 'review' is the text column"):
        read_dataset(uri, label="review", text={"column": "review"})


def test_the_label_defaults_to_the_first_column_when_the_text_is_last(mem):
    uri = put(mem("t.csv"), "label,text\nspam,win money now\nham,see you at noon\n")
    ds = read_dataset(uri, text={"column": "text"})
    assert ds.classes == ["ham", "spam"] and ds.y.tolist() == [1, 0]


def test_a_parquet_text_column(mem):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    buf = io_bytes(pq, pa.table({"text": ["good film", "bad film", "good"], "stars": [5, 1, 4]}))
    uri = put(mem("r.parquet"), buf)
    ds = read_dataset(uri, label="stars", text={"column": "text", "hash_bits": 10})
    assert ds.y.tolist() == [5, 1, 4] and ds.classes is None and ds.x.max() < 1024
    np.testing.assert_array_equal(ds.x, encode(["good film", "bad film", "good"], bits=10))
    with pytest.raises(ValueError, match="column 'stars' has type int64, expected text"):
        read_dataset(uri, label="text", text={"column": "stars"})


def io_bytes(pq, table) -> bytes:
    import io
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def test_text_options_on_data_that_is_not_text_are_refused(mem):
    uri = put(mem("a.csv"), "x,y\n1,0\n2,1\n")
    assert read_dataset(uri).x.dtype == np.float32  # no text options: a numeric table as before
    with pytest.raises(ValueError, match="text options apply to text data .* not to format 'npz'"):
        read_dataset(mem("a.npz"), text={})
    with pytest.raises(ValueError, match="data.text.hash_bits: expected an integer in \\[1, 30\\], got 40"):
        read_dataset(uri, text={"column": "x", "hash_bits": 40})
    with pytest.raises(ValueError, match="data.text.stem: unknown key"):
        read_dataset(uri, text={"stem": True})
    with pytest.raises(ValueError, match="builtin:digits is not text"):
        read_dataset("builtin:digits", text={})
    with pytest.raises(ValueError, match="synthetic:ctr\\?n=10 is not text"):
        read_dataset("synthetic:ctr?n=10", text={})


# --- the job spec's data.text ----------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ({"hash_bits": 40}, "spec.data.text.hash_bits: expected an integer in [1, 30], got 40"),
    ({"hash_bits": 0}, "spec.data.text.hash_bits: expected an integer in [1, 30], got 0"),
    ({"hash_bits": True}, "spec.data.text.hash_bits: expected an integer in [1, 30], got True"),
    ({"ngrams": 6}, "spec.data.text.ngrams: expected an integer in [1, 5], got 6"),
    ({"max_tokens": 2.5}, "spec.data.text.max_tokens: expected an integer in [1, 65536], got 2.5"),
    ({"column": ["a"]}, "spec.data.text.column: expected a column name or index, got ['a']"),
    ({"lower": False}, "spec.data.text.lower: unknown key (known: column, ngrams, hash_bits, max_tokens)"),
    ("yes", "spec.data.text: expected an object with keys column, ngrams, hash_bits, max_tokens, got 'yes'"),
], ids=["bits-high", "bits-zero", "bits-bool", "ngrams", "max-tokens", "column", "unknown", "not-an-object"])
def test_a_spec_with_bad_text_options_names_the_key(text, message):
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict({"data": {"uri": "builtin:fortunes", "text": text}})
    assert str(err.value) == message


def test_a_spec_carries_text_options_to_the_reader():
    spec = JobSpec.from_dict({"data": {"uri": "builtin:fortunes", "scale": "none",
                                       "text": {"ngrams": 2, "hash_bits": 12}}})
    again = JobSpec.from_json(spec.to_json())
    assert again.data.text == {"ngrams": 2, "hash_bits": 12} and JobSpec().data.text is None
    ds = read_dataset(again.data.uri, again.data.format, label=again.data.label, text=again.data.text)
    assert ds.x.max() < 4096 and ds.x.shape == (4559, TEXT_DEFAULTS["max_tokens"])


# --- builtin:fortunes --------------------------------------------------------------------------

FORTUNE_COUNTS = {"computers": 1050, "food": 197, "law": 202, "love": 150, "politics": 700, "science": 623,
                  "songs-poems": 716, "sports": 147, "startrek": 227, "zippy": 547}


def test_fortunes_load_with_their_size_and_class_counts():
    ds = read_dataset("builtin:fortunes")
    assert ds.x.dtype == np.int64 and ds.x.shape == (4559, 256)
    assert ds.classes == sorted(FORTUNE_COUNTS)
    assert dict(zip(ds.classes, np.bincount(ds.y).tolist())) == FORTUNE_COUNTS
    assert ds.x.min() == -1 and ds.x.max() < 2 ** 20
    assert (ds.x[:, 0] >= 0).all()  # every fortune has a token
    third = "1: No code table for op: ++post"  # computers' third fortune, in file order
    assert ds.x[2][ds.x[2] >= 0].tolist() == hash_tokens(["1", "no", "code", "table", "for", "op", "post"], 20).tolist()
    assert tokenize(third) == ["1", "no", "code", "table", "for", "op", "post"]


def test_fortunes_take_the_text_options():
    small = load_builtin("fortunes", text={"hash_bits": 8, "max_tokens": 16, "ngrams": 2})
    assert small.x.shape == (4559, 16) and 0 <= small.x[:, 0].min() and small.x.max() < 256
    with pytest.raises(ValueError, match="data.text.column: builtin:fortunes has no columns"):
        load_builtin("fortunes", text={"column": "text"})
    with pytest.raises(ValueError, match="unknown built-in dataset 'imdb' \\(available: digits, fortunes\\)"):
        read_dataset("builtin:imdb")


def test_the_fortunes_file_is_small_and_carries_its_license():
    data = resources.files("ps.worker") / "data"
    assert len((data / "fortunes.tsv.gz").read_bytes()) < 2_000_000
    text = (data / "FORTUNES_LICENSE.txt").read_text()
    for words in ("Debian", "fortunes\" 1:1.99.1-7.3", "The Regents of the University of California",
                  "Redistribution and use", "mtime 0"):
        assert words in text


def test_a_hashed_softmax_regression_beats_the_majority_class_on_fortunes_by_far():
    ds = load_builtin("fortunes", text={"hash_bits": 18})
    train, test = train_test_split(len(ds.y), 0.3, seed=0)
    majority = majority_accuracy(ds.y, train, test)
    accuracy = softmax_regression_accuracy(ds.x, ds.y, train, test)
    print(f"fortunes: majority {majority:.3f}, hashed softmax regression {accuracy:.3f}")
    assert majority == pytest.approx(0.23, abs=0.02)  # computers, 1050 of 4559
    assert accuracy > 0.5 and accuracy > 2 * majority


# --- synthetic:ctr -----------------------------------------------------------------------------

def test_ctr_gives_each_field_its_own_id_range():
    ds = read_dataset("synthetic:ctr?n=5000&fields=3&ids=10&seed=1")
    assert ds.x.shape == (5000, 3) and ds.x.dtype == np.int64 and ds.y.dtype == np.int64
    assert set(np.unique(ds.y)) == {0, 1}
    # 10 ids over 3 fields: 4, 3 and 3 ids, consecutive ranges
    assert set(ds.x[:, 0]) <= {0, 1, 2, 3} and set(ds.x[:, 1]) <= {4, 5, 6} and set(ds.x[:, 2]) <= {7, 8, 9}
    assert ds.feature_names == ["field0", "field1", "field2"]


def test_ctr_is_deterministic_for_a_seed():
    uri = "synthetic:ctr?n=2000&fields=4&ids=1e4&seed=3"
    a, b = read_dataset(uri), read_dataset(uri)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, read_dataset(uri.replace("seed=3", "seed=4")).x)
    # PCG64 draws and a cumulative sum that rounds the same everywhere: these ids on any machine
    assert a.x[:2].tolist() == [[1266, 3300, 5827, 8780], [951, 4090, 5460, 8367]]
    assert int(a.y.sum()) == 665


def test_ctr_ids_are_skewed_and_clicks_are_a_minority():
    ds = ctr(n=200_000, fields=8, ids=1_000_000, seed=0)
    assert 0.15 < ds.y.mean() < 0.35
    for f in range(8):
        counts = np.bincount(ds.x[:, f] - f * 125_000, minlength=125_000)
        assert counts.sum() == 200_000 and len(counts) == 125_000
        top = np.sort(counts)[::-1]
        assert top[0] > 0.05 * 200_000  # the most popular id: ~1/H(125000) ~ 8% of draws
        assert top[:100].sum() > 0.35 * 200_000 and (counts == 0).sum() > 60_000  # a long, thin tail


def test_ctr_with_a_million_ids_is_fast():
    start = time.perf_counter()
    ds = read_dataset("synthetic:ctr?n=200000&fields=8&ids=1000000")
    elapsed = time.perf_counter() - start
    assert ds.x.shape == (200_000, 8) and ds.x.max() < 1_000_000
    assert elapsed < 10  # about 0.4 s here; a generous bound for a loaded CI machine


def test_ctr_clicks_are_learnable_above_the_base_rate():
    ds = ctr(n=60_000, fields=4, ids=2_000, seed=2)
    train, test = train_test_split(len(ds.y), 0.3, seed=0)
    majority = majority_accuracy(ds.y, train, test)
    accuracy = softmax_regression_accuracy(ds.x, ds.y, train, test)
    print(f"ctr: majority {majority:.3f}, per-id logistic regression {accuracy:.3f}")
    assert accuracy > majority + 0.05


def test_ctr_refuses_bad_sizes_before_drawing():
    with pytest.raises(ValueError, match="ids must be an integer of at least the number of fields, got 3"):
        read_dataset("synthetic:ctr?fields=4&ids=3")
    with pytest.raises(ValueError, match="unknown parameter 'features' \\(known: n, fields, ids, seed\\)"):
        read_dataset("synthetic:ctr?features=4")
    with pytest.raises(ValueError, match="unknown parameter 'fields'"):
        read_dataset("synthetic:classification?fields=4")
    with pytest.raises(ValueError, match=f"synthetic:ctr: ids = {10**9} exceeds the limit {D.max_synthetic_values}"):
        read_dataset("synthetic:ctr?ids=1e9")


@pytest.mark.parametrize("uri, message", [
    ("synthetic:ctr?n=1e9&fields=8", (f"spec.data.uri: n x fields = {8 * 10**9} exceeds the limit "
                                      f"{D.max_synthetic_values} {D.hint('max_synthetic_values')}")),
    ("synthetic:ctr?n=1e8", (f"spec.data.uri: n x fields = {8 * 10**8} exceeds the limit "  # fields: 8
                             f"{D.max_synthetic_values} {D.hint('max_synthetic_values')}")),
    ("synthetic:ctr?ids=1e9", (f"spec.data.uri: ids = {10**9} exceeds the limit {D.max_synthetic_values} "
                               f"{D.hint('max_synthetic_values')}")),
    ("synthetic:ctr?ids=many", "spec.data.uri: parameter 'ids' must be a whole number, got 'many'"),
], ids=["n-x-fields", "default-fields", "ids", "not-a-number"])
def test_a_spec_with_a_ctr_uri_over_the_limits_names_the_size(uri, message):
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict({"data": {"uri": uri}, "loss": "binary_cross_entropy"})
    assert str(err.value) == message


def test_the_limits_know_ctrs_defaults():
    defaults = {k: p.default for k, p in inspect.signature(ctr).parameters.items() if k != "seed"}
    assert defaults == SYNTHETIC_CTR_DEFAULTS

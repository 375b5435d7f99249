"""The data policy (ps.data_policy): where a job's data may be read from, checked by the scheduler
on a spec and by a worker before it opens anything. Real files and symlinks in tmp dirs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ps import data_policy as dp
from ps.data_policy import DataPolicy
from ps.errors import InvalidArgument, PermissionDenied, PSError, ResourceExhausted
from ps.spec import JobSpec, SpecError


@pytest.fixture
def tree(tmp_path):
    """root/ (the data root) with a CSV in it, root2/ beside it, outside/ with a secret, and
    symlinks in root/ to both."""
    base = tmp_path.resolve()
    root, root2, outside = base / "data", base / "data2", base / "outside"
    for d in (root, root2, outside, root / "sub"):
        d.mkdir()
    (root / "ok.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,6,0\n")
    (root2 / "ok.csv").write_text("a,label\n1,0\n2,1\n")
    (outside / "secret.csv").write_text("a,label\n1,0\n2,1\n")
    (root / "escape.csv").symlink_to(outside / "secret.csv")
    (root / "escape_dir").symlink_to(outside)
    (root / "inside.csv").symlink_to(root / "ok.csv")
    return {"base": base, "root": str(root), "root2": str(root2), "outside": str(outside)}


def refused(policy: DataPolicy, uri: str, field: str = "data.uri", exc=PermissionDenied) -> str:
    with pytest.raises(exc) as err:
        policy.check(uri, field)
    return str(err.value)


# -- local paths -------------------------------------------------------------------------------

def test_a_path_under_a_root_is_allowed_and_one_outside_is_refused_naming_field_and_roots(tree):
    p = DataPolicy.from_values([tree["root"]], None)
    p.check(f"{tree['root']}/ok.csv", "data.uri")
    p.check(f"{tree['root']}/sub/not-there-yet.csv", "data.uri")  # existence is the reader's business
    p.check(f"{tree['root']}/inside.csv", "data.uri")  # a symlink that stays inside
    assert refused(p, "/etc/passwd") == (
        f"spec field 'data.uri': /etc/passwd is outside the allowed data roots ({tree['root']}); "
        f"the scheduler and workers read only under --data-root")


def test_dot_dot_cannot_escape_a_root(tree):
    p = DataPolicy.from_values(tree["root"], None)
    uri = f"{tree['root']}/sub/../../outside/secret.csv"
    assert refused(p, uri) == (f"spec field 'data.uri': {uri} is outside the allowed data roots ({tree['root']}); "
                               f"the scheduler and workers read only under --data-root")
    p.check(f"{tree['root']}/sub/../ok.csv", "data.uri")  # '..' that stays inside is fine


def test_a_symlink_inside_the_root_pointing_outside_is_refused(tree):
    p = DataPolicy.from_values(tree["root"], None)
    for uri in (f"{tree['root']}/escape.csv", f"{tree['root']}/escape_dir/secret.csv"):
        msg = refused(p, uri)
        assert msg == (f"spec field 'data.uri': {uri} resolves (through '..' or a symlink) to a path outside the "
                       f"allowed data roots ({tree['root']}); the scheduler and workers read only under --data-root")
        assert tree["outside"] not in msg  # the symlink's target is not told


def test_roots_compare_by_path_components_not_string_prefix(tree):
    p = DataPolicy.from_values(tree["root"], None)
    assert "is outside the allowed data roots" in refused(p, f"{tree['root2']}/ok.csv")
    both = DataPolicy.from_values(f"{tree['root']},{tree['root2']}", None)
    both.check(f"{tree['root2']}/ok.csv", "data.uri")
    everything = DataPolicy.from_values("/", None)
    everything.check("/etc/passwd", "data.uri")


def test_file_urls_are_local_paths(tree):
    p = DataPolicy.from_values(tree["root"], None)
    p.check(f"file://{tree['root']}/ok.csv", "data.uri")
    p.check(f"file:{tree['root']}/ok.csv", "data.uri")      # fsspec strips 'file:' too
    p.check(f"local://{tree['root']}/ok.csv", "data.uri")
    assert "is outside the allowed data roots" in refused(p, "file:///etc/passwd")
    assert "is outside the allowed data roots" in refused(p, "file:/etc/passwd")
    assert "resolves (through '..' or a symlink)" in refused(p, f"file://{tree['root']}/escape.csv")
    # file://host/path is a relative path to fsspec (cwd/host/path): refused as relative
    assert refused(p, "file://localhost/etc/passwd") == (
        f"spec field 'data.uri': file://localhost/etc/passwd is a relative path; with --data-root set a data "
        f"path must be absolute (under {tree['root']})")


def test_relative_home_and_glob_paths_are_refused_when_restricted(tree, monkeypatch):
    monkeypatch.chdir(tree["root"])  # even where the relative path would land inside the root
    p = DataPolicy.from_values(tree["root"], None)
    assert "ok.csv is a relative path" in refused(p, "ok.csv")
    assert "~/x.csv is a relative path" in refused(p, "~/x.csv")
    assert refused(p, f"{tree['root']}/*.csv") == (f"spec field 'data.uri': {tree['root']}/*.csv has a glob "
                                                  f"character ('*'); name one file")
    assert "glob character ('[')" in refused(p, f"{tree['root']}/o[k].csv")
    assert "NUL" in refused(p, f"{tree['root']}/ok.csv\x00")


def test_without_local_roots_no_local_file_is_allowed(tree):
    p = DataPolicy.from_values("s3://bucket/train", "gs")
    assert refused(p, f"{tree['root']}/ok.csv", "data.label") == (
        f"spec field 'data.label': {tree['root']}/ok.csv is a local path, and no local data root is configured "
        f"(allowed: s3://bucket/train; protocols gs); the scheduler and workers read local files only under "
        f"--data-root")


# -- URLs --------------------------------------------------------------------------------------

def test_a_protocol_not_allowed_is_refused_and_an_allowed_one_passes():
    p = DataPolicy.from_values(None, "s3")
    assert refused(p, "http://example.com/d.csv", "data.uri") == (
        "spec field 'data.uri': protocol 'http' is not allowed (allowed: s3); see --data-protocols")
    p.check("s3://any-bucket/any/key.csv", "data.uri")
    assert "protocol 'memory' is not allowed" in refused(p, "memory://x/d.csv")
    assert "protocol 'data' is not allowed" in refused(p, "data:,a%2Clabel%0A1%2C0")
    assert "protocol 'S3' is not allowed" in refused(p, "S3://bucket/x.csv")  # fsspec knows no 'S3' either
    # still no '..' or glob on an allowed protocol
    assert "has a '..' segment" in refused(p, "s3://bucket/a/../b.csv")
    assert "glob character ('*')" in refused(p, "s3://bucket/*.csv")


def test_url_roots_allow_what_lies_under_them_by_component():
    p = DataPolicy.from_values(["s3://bucket/train/", "https://host.example/data"], None)
    assert p.roots == ("s3://bucket/train", "https://host.example/data")
    p.check("s3://bucket/train/a.csv", "data.uri")
    p.check("s3://bucket/train/deep/er/a.parquet", "data.uri")
    p.check("https://host.example/data/a.csv?token=x", "data.uri")  # an http query names no location
    assert refused(p, "s3://bucket/training/a.csv") == (
        "spec field 'data.uri': s3://bucket/training/a.csv is outside the allowed data roots (s3://bucket/train); "
        "the scheduler and workers read s3 URLs only under --data-root")
    assert "is outside" in refused(p, "s3://bucket/a.csv")
    assert "is outside" in refused(p, "s3://other/train/a.csv")
    assert "is outside" in refused(p, "https://host.example.evil.com/data/a.csv")
    assert "is outside" in refused(p, "https://host.example@evil.com/data/a.csv")
    assert "has a '..' segment" in refused(p, "s3://bucket/train/../secret/a.csv")
    assert "has a '..' segment" in refused(p, "https://host.example/data/%2e%2e/admin")
    assert "has a '..' segment" in refused(p, "https://host.example/data/%252e%252e/admin")
    assert "has a '.' segment" in refused(p, "s3://bucket/train/./a.csv")
    assert "has a '//' segment" in refused(p, "s3://bucket//train/a.csv")
    assert "protocol 'gs' is not allowed (allowed: none; URLs under s3://bucket/train, https://host.example/data)" \
        in refused(p, "gs://bucket/train/a.csv")


def test_chained_urls_need_every_protocol_allowed_and_every_location_inside(tree):
    p = DataPolicy.from_values(["s3://bucket/train", tree["root"]], "zip,simplecache")
    p.check("zip://member.csv::s3://bucket/train/a.zip", "data.uri")
    p.check("simplecache::s3://bucket/train/a.csv", "data.uri")
    p.check(f"zip://member.csv::{tree['root']}/a.zip", "data.uri")
    p.check(f"zip://member.csv::file://{tree['root']}/a.zip", "data.uri")
    assert refused(p, "zip::s3://bucket/other/a.zip") == (
        "spec field 'data.uri': s3://bucket/other/a.zip is outside the allowed data roots (s3://bucket/train) "
        "(in the chained URL zip::s3://bucket/other/a.zip); the scheduler and workers read s3 URLs only under "
        "--data-root")
    assert "resolves (through '..' or a symlink)" in refused(p, f"simplecache::{tree['root']}/escape.csv")
    assert "/etc/passwd is outside" in refused(p, "simplecache::file:///etc/passwd")
    # an outer local link is a location too (fsspec opens it with the local file system)
    assert "/etc/passwd is outside" in refused(p, f"file:///etc/passwd::{tree['root']}/ok.csv")
    narrow = DataPolicy.from_values(["s3://bucket/train"], None)
    assert refused(narrow, "zip://m.csv::s3://bucket/train/a.zip") == (
        "spec field 'data.uri': protocol 'zip' (in the chained URL zip://m.csv::s3://bucket/train/a.zip) is not "
        "allowed (allowed: none; URLs under s3://bucket/train); see --data-protocols")
    assert "protocol 'reference' (in the chained URL reference::s3://bucket/train/r.json) is never allowed" in \
        refused(p, "reference::s3://bucket/train/r.json")
    assert "is a relative path" in refused(p, "zip://m.csv::a.zip")


def test_chained_urls_split_as_fsspec_splits_them(tree):
    from fsspec.core import _un_chain
    for uri in (f"zip://m.csv::{tree['root']}/a.zip", "simplecache::file:///etc/passwd", f"file:{tree['root']}/x",
                "zip://m::s3://b/k.zip", "/etc/a::b.csv"):
        try:
            theirs = [(proto if proto not in ("file", "local") else "file") for _, proto, _ in _un_chain(uri, {})]
        except (ValueError, ImportError):  # a protocol whose package is not installed (s3fs)
            continue
        links = dp._links(uri)
        assert [link.protocol for link in links] == theirs, uri
        for link, (path, _, _) in zip(links, _un_chain(uri, {})):
            if link.protocol == "file" and link.path.startswith("/"):  # the very path fsspec opens
                assert link.path == path, uri


# -- builtin:, synthetic:, unrestricted ----------------------------------------------------------

def test_builtin_and_synthetic_are_always_allowed():
    nothing_local = DataPolicy.from_values(None, "s3")
    for uri in ("builtin:digits", "builtin:digits?image=1", "synthetic:classification?n=1000",
                "synthetic:classification?n=60000&features=256&classes=10&seed=0",  # ps.bench's
                "synthetic:regression?n=20000&features=4&noise=0.5&seed=1", "synthetic:classification"):
        nothing_local.check(uri, "data.uri")
        DataPolicy().check(uri, "data.uri")


@pytest.mark.parametrize("uri,message", [
    (f"synthetic:classification?n={dp.SYNTHETIC_MAX_N + 1}&features=1",
     f"synthetic parameter 'n' = {dp.SYNTHETIC_MAX_N + 1} exceeds the limit {dp.SYNTHETIC_MAX_N} (SYNTHETIC_MAX_N "),
    ("synthetic:regression?n=10&features=1e9",
     (f"synthetic parameter 'features' = {10**9} exceeds the limit {dp.SYNTHETIC_MAX_FEATURES} "
      f"(SYNTHETIC_MAX_FEATURES ")),
    ("synthetic:classification?n=10&classes=70000",
     f"synthetic parameter 'classes' = 70000 exceeds the limit {dp.SYNTHETIC_MAX_CLASSES} (SYNTHETIC_MAX_CLASSES "),
    ("synthetic:classification?n=1e8&features=1&classes=1000",  # under ps.limits' default, not here
     f"synthetic n x classes = {10**11} exceeds the limit {dp.SYNTHETIC_MAX_VALUES} (SYNTHETIC_MAX_VALUES "),
    ("synthetic:classification?n=1e9&features=20",
     f"synthetic n x features = {2 * 10**10} exceeds the limit {dp.SYNTHETIC_MAX_VALUES} (SYNTHETIC_MAX_VALUES "),
    ("synthetic:regression?n=1e8&features=20",
     (f"synthetic size (estimated bytes) = {4 * 10**8 * 20 + 80 + 32 * 10**8} exceeds the limit "
      f"{dp.SYNTHETIC_MAX_BYTES} (SYNTHETIC_MAX_BYTES ")),
    ("synthetic:classification?n=10&n=1e10",  # a repeated key: every occurrence is checked
     f"synthetic parameter 'n' = {10**10} exceeds the limit {dp.SYNTHETIC_MAX_N}"),
], ids=["n", "features", "classes", "n-x-classes", "n-x-features", "bytes", "repeated"])
def test_synthetic_sizes_beyond_the_bounds_are_refused_naming_the_parameter(uri, message):
    for policy in (DataPolicy(), DataPolicy.from_values("/", "s3")):
        msg = refused(policy, uri, "data.uri", ResourceExhausted)
        assert msg.startswith(f"spec field 'data.uri': {message}"), msg


def test_a_synthetic_size_that_is_no_number_is_invalid():
    assert refused(DataPolicy(), "synthetic:classification?n=lots", "data.uri", InvalidArgument) == (
        "spec field 'data.uri': synthetic parameter 'n' must be a whole number, got 'lots'")
    assert "must be a whole number" in refused(DataPolicy(), "synthetic:classification?n=1e400", "data.uri",
                                               InvalidArgument)


def test_unrestricted_by_default_allows_everything():
    p = DataPolicy()
    assert p.unrestricted and DataPolicy.from_values(None, None).unrestricted
    assert DataPolicy.from_values("", " , ").unrestricted
    assert DataPolicy.from_env({}).unrestricted
    for uri in ("/etc/passwd", "relative.csv", "file:///etc/passwd", "http://example.com/x.csv", "memory://x",
                "zip::s3://b/a.zip", "reference::x", "/data/*.csv", "s3://b/../x"):
        p.check(uri, "data.uri")
    assert p.describe().startswith("data: unrestricted")


# -- settings ----------------------------------------------------------------------------------

def test_settings_take_lists_or_comma_separated_strings_and_normalise_roots(tree):
    link = tree["base"] / "data-link"
    link.symlink_to(tree["root"])
    p = DataPolicy.from_values(f" {link}/ , s3://bucket/train/,{tree['root']}", "S3, gs://")
    assert p.roots == (tree["root"], "s3://bucket/train") and p.protocols == ("s3", "gs")
    assert p.local_roots == (tree["root"],) and p.url_roots == ("s3://bucket/train",)
    assert DataPolicy.from_values([tree["root"], f"file://{tree['root2']}"], ["s3"]).roots == \
        (tree["root"], tree["root2"])
    assert not p.unrestricted
    assert p.describe() == (f"data: local files under {tree['root']}; URLs under s3://bucket/train; any URL of the "
                            f"protocols s3, gs; builtin: and synthetic: always (synthetic: at most "
                            f"{dp.SYNTHETIC_MAX_VALUES} values an array, 8 GiB in all)")
    env = DataPolicy.from_env({"PS_DATA_ROOTS": f"{tree['root']},{tree['root2']}", "PS_DATA_PROTOCOLS": "s3"})
    assert env == DataPolicy.from_values([tree["root"], tree["root2"]], ["s3"])


@pytest.mark.parametrize("roots,protocols,message", [
    ("data,/scratch", None, "data root 'data' is a relative path: give an absolute one (e.g. /data)"),
    ("~/data", None, "data root '~/data' is a relative path"),
    ("/data,file://data", None, "data root 'file://data' is a relative path"),
    ("zip::s3://b/x", None, "data root 'zip::s3://b/x' is a chained URL"),
    ("s3://b/../x", None, "data root 's3://b/../x' has a '..' segment"),
    (None, "file", "data protocol 'file' is the local file system"),
    (None, "reference", "data protocol 'reference' reads the locations"),
    (None, "s3 x", "data protocol 's3 x' is not an fsspec protocol name"),
])
def test_bad_settings_are_value_errors_naming_them(roots, protocols, message):
    with pytest.raises(ValueError) as err:
        DataPolicy.from_values(roots, protocols)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="PS_DATA_ROOTS="):
        DataPolicy.from_env({"PS_DATA_ROOTS": "relative"})


# -- a whole spec ------------------------------------------------------------------------------

def test_check_spec_names_the_field_that_points_outside(tree):
    p = DataPolicy.from_values(tree["root"], None)
    ok = JobSpec.from_dict({"data": {"uri": f"{tree['root']}/ok.csv", "label": "label"},
                            "checkpoint_dir": "/anywhere/checkpoints"})  # checkpoints are not data
    p.check_spec(ok)
    p.check_spec(JobSpec())  # builtin:digits
    with pytest.raises(PermissionDenied, match=r"^spec field 'data.uri': /etc/passwd is outside"):
        p.check_spec(JobSpec.from_dict({"data": "/etc/passwd"}))
    # IDX: the label is the labels file's URI
    idx = JobSpec.from_dict({"data": {"uri": f"{tree['root']}/x.idx3", "label": f"{tree['outside']}/y.idx1"}})
    with pytest.raises(PermissionDenied) as err:
        p.check_spec(idx)
    assert str(err.value) == (f"spec field 'data.label': {tree['outside']}/y.idx1 is outside the allowed data roots "
                              f"({tree['root']}); the scheduler and workers read only under --data-root")
    # ... and for other formats a column name, never opened
    p.check_spec(JobSpec.from_dict({"data": {"uri": f"{tree['root']}/ok.csv", "label": "/etc/passwd"}}))
    # the labels file guessed from train-images-idx3-ubyte, through a directory that is a symlink out
    (tree["base"] / "data" / "labels-idx1").symlink_to(tree["outside"])
    (tree["base"] / "data" / "images-idx3").mkdir()
    guessed = JobSpec.from_dict({"data": {"uri": f"{tree['root']}/images-idx3/train-images-idx3-ubyte"}})
    with pytest.raises(PermissionDenied, match=r"^spec field 'data.uri': .*/labels-idx1/train-labels-idx1-ubyte "
                                               r"resolves \(through '\.\.' or a symlink\)"):
        p.check_spec(guessed)
    with pytest.raises(ResourceExhausted, match=r"^spec field 'data.uri': synthetic n x classes"):
        p.check_spec(JobSpec.from_dict({"data": "synthetic:classification?n=1e8&features=1&classes=1000"}))
    assert [f for f, _ in dp.spec_data_uris(idx)] == ["data.uri", "data.label"]


def test_the_idx_rule_matches_the_reader():
    from ps.worker.data import infer_format
    for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "x.idx", "x.idx3", "x.idx1.gz",
                 "x.idx3-ubyte", "x.csv", "x.csv.gz", "x.npz", "dir/x.parquet", "s3://b/x.idx"):
        assert dp._idx_format(name, None) == (infer_format(name) == "idx"), name
    assert dp._idx_format("x.csv", "IDX") and not dp._idx_format("x.idx", "csv")


# -- the worker refuses to open, too --------------------------------------------------------------

def test_the_worker_refuses_to_open_a_path_outside_the_roots(tree, monkeypatch):
    from ps.worker import data
    p = DataPolicy.from_values(tree["root"], None)
    secret = f"{tree['outside']}/secret.csv"
    opened = []
    real_open = data.fsspec.open
    monkeypatch.setattr(data.fsspec, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with pytest.raises(PermissionDenied) as err:
        data.read_dataset(secret, policy=p)
    assert str(err.value) == (f"spec field 'data.uri': {secret} is outside the allowed data roots ({tree['root']}); "
                              f"the scheduler and workers read only under --data-root")
    assert isinstance(err.value, PSError) and isinstance(err.value, PermissionError)
    with pytest.raises(PermissionDenied, match="resolves"):
        data.read_dataset(f"{tree['root']}/escape.csv", policy=p)
    assert opened == []  # refused before anything was opened
    ds = data.read_dataset(f"{tree['root']}/ok.csv", policy=p)
    np.testing.assert_array_equal(ds.y, [0, 1, 0])
    assert data.read_dataset("builtin:digits", policy=p).x.shape == (1797, 64)


def test_the_worker_process_policy_comes_from_set_policy_or_the_environment(tree, monkeypatch):
    from ps.worker import data
    secret = f"{tree['outside']}/secret.csv"
    monkeypatch.delenv("PS_DATA_ROOTS", raising=False)
    monkeypatch.delenv("PS_DATA_PROTOCOLS", raising=False)
    try:
        assert len(data.read_dataset(secret)) == 2  # unrestricted, as before
        monkeypatch.setenv("PS_DATA_ROOTS", tree["root"])
        with pytest.raises(PermissionDenied, match="is outside the allowed data roots"):
            data.read_dataset(secret)
        monkeypatch.delenv("PS_DATA_ROOTS")
        data.set_policy(DataPolicy.from_values(tree["root"], None))
        with pytest.raises(PermissionDenied, match="is outside the allowed data roots"):
            data.read_dataset(secret)
        # the inspect task's path: spec -> load_data -> read_dataset (a PermissionError: a SpecError there)
        from ps.worker.inspect import prepare
        with pytest.raises(SpecError, match="is outside the allowed data roots"):
            prepare(JobSpec.from_dict({"data": secret}))
    finally:
        data.set_policy(None)
        data.clear_cache()


def test_the_worker_checks_an_idx_labels_file_before_reading_either(tree, monkeypatch):
    from ps.worker import data
    header = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big")
    with open(os.path.join(tree["root"], "x.idx1"), "wb") as f:
        f.write(header + bytes([1, 2, 3]))
    with open(os.path.join(tree["outside"], "y.idx1"), "wb") as f:
        f.write(header + bytes([0, 1, 0]))
    p = DataPolicy.from_values(tree["root"], None)
    opened = []
    real_open = data.fsspec.open
    monkeypatch.setattr(data.fsspec, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with pytest.raises(PermissionDenied, match=r"^spec field 'data.label': .*/outside/y.idx1 is outside"):
        data.read_dataset(f"{tree['root']}/x.idx1", label=f"{tree['outside']}/y.idx1", policy=p)
    assert opened == []
    with pytest.raises(PermissionDenied, match=r"^spec field 'data.label'"):
        data.read_idx(f"{tree['outside']}/y.idx1", policy=p, field="data.label")
    assert data.read_idx(f"{tree['root']}/x.idx1", policy=p).tolist() == [1, 2, 3]


def test_the_worker_bounds_synthetic_data_before_generating():
    from ps.worker import data
    with pytest.raises(ResourceExhausted, match="synthetic n x classes"):
        data.read_dataset("synthetic:classification?n=1e8&features=1&classes=1000")

"""The fetch stage: downloads against a local fault-injecting server, the sha256-keyed cache,
local files, and the stage script. All offline: the server listens on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import http_faults
import pytest
import yaml
from http_faults import (
    close_after,
    ignore_range,
    redirect,
    reset_after,
    serve,
    stall_after,
    status,
    trickle,
    understate_length,
)

from retrain.errors import DownloadError
from retrain.fetch import fetch_dataset
from retrain.synthetic import write_dataset
from retrain.urls import redact

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = 3, 4
# Short timeouts and backoff keep the fault cases fast.
FAST = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01}

server = http_faults.fault_server


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy from the environment must not intercept requests to 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> tuple[bytes, str]:
    """A small class-folder tarball in the official layout: its bytes and sha256."""
    path = write_dataset(tmp_path_factory.mktemp("tarball") / "shapes.tgz", classes=CLASSES,
                         per_class=PER_CLASS, size=32, seed=0, top_folder="shapes")
    body = path.read_bytes()
    assert len(body) > 5000  # the fault cases cut it at 1000-2000 bytes
    return body, hashlib.sha256(body).hexdigest()


def fetch(url, sha256, tmp_path, **kwargs) -> Path:
    options = {**FAST, "cache_dir": tmp_path / "cache", **kwargs}
    return fetch_dataset(url, sha256, tmp_path / "raw", **options)[0]


def assert_dataset(dataset: Path, name: str = "shapes") -> None:
    assert dataset.name == name and dataset.parent.name == "raw"
    classes = sorted(p.name for p in dataset.iterdir() if p.is_dir())
    assert classes == [f"class_{i:03d}" for i in range(CLASSES)]
    assert all(len(list((dataset / c).iterdir())) == PER_CLASS for c in classes)


def cached(tmp_path: Path, sha256: str) -> list[str]:
    downloads = tmp_path / "cache" / "downloads"
    if not downloads.exists():
        return []
    return sorted(p.name for p in downloads.iterdir() if not p.name.startswith("."))  # no locks


# --------------------------------------------------------------------------- http faults

# (id, script of behaviours, Range header of each request). One line per case.
RECOVERABLE = [
    ("plain", [serve], [None]),
    ("500 then ok", [status(500), serve], [None, None]),
    ("503 twice then ok", [status(503), status(503), serve], [None, None, None]),
    ("429 then ok", [status(429, retry_after="0"), serve], [None, None]),
    ("reset mid-body, resumed", [reset_after(1000), serve], [None, "bytes=1000-"]),
    ("two resets, resumed twice", [reset_after(1000), reset_after(1000), serve],
     [None, "bytes=1000-", "bytes=2000-"]),
    ("Content-Length longer than body", [close_after(1500), serve], [None, "bytes=1500-"]),
    ("stall mid-body, resumed", [stall_after(1200), serve], [None, "bytes=1200-"]),
    ("trickle, then ok", [trickle(), serve], [None, "bytes=*"]),
    ("server ignores Range", [reset_after(1000), ignore_range], [None, "bytes=1000-"]),
]


@pytest.mark.parametrize("script, ranges", [case[1:] for case in RECOVERABLE],
                         ids=[case[0] for case in RECOVERABLE])
def test_download_recovers(server, tarball, tmp_path, script, ranges):
    body, sha256 = tarball
    url = server.route("/shapes.tgz", body, *script)
    assert_dataset(fetch(url, sha256, tmp_path))
    seen = server.range_headers("/shapes.tgz")
    assert len(seen) == len(ranges)
    for got, expected in zip(seen, ranges, strict=True):
        assert got == expected or (expected == "bytes=*" and got.startswith("bytes="))
    assert cached(tmp_path, sha256) == [sha256]  # the .part file became the cache entry


# (id, script, error pattern, number of requests) with FAST's retries=2: 3 attempts at most.
FAILING = [
    ("404", [status(404)], r"^HTTP 404 for http://127\.0\.0\.1:\d+/shapes\.tgz$", 1),
    ("403", [status(403)], r"^HTTP 403 for http://", 1),
    ("410", [status(410)], r"^HTTP 410 for http://", 1),
    ("500 forever", [status(500)], r"failed after 3 attempts \(last: HTTP 500\)", 3),
    ("429 forever", [status(429)], r"failed after 3 attempts \(last: HTTP 429\)", 3),
    ("stall forever", [stall_after(100)], r"failed after 3 attempts \(last: no data for 0.5 s\)",
     3),
    ("trickle forever", [trickle()], r"failed after 3 attempts \(last: stalled: ", 3),
    ("resets forever", [reset_after(0)], r"failed after 3 attempts", 3),
    ("body longer than Content-Length", [understate_length(100)], r"sha256 mismatch", 1),
]


@pytest.mark.parametrize("script, pattern, requests", [case[1:] for case in FAILING],
                         ids=[case[0] for case in FAILING])
def test_download_fails_cleanly(server, tarball, tmp_path, script, pattern, requests):
    body, sha256 = tarball
    url = server.route("/shapes.tgz", body, *script)
    with pytest.raises(DownloadError, match=pattern) as info:
        fetch(url, sha256, tmp_path)
    assert "\n" not in str(info.value)
    assert len(server.requests("/shapes.tgz")) == requests
    assert not (tmp_path / "raw").exists()
    assert sha256 not in cached(tmp_path, sha256)  # no complete-looking cache entry
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_redirect_is_followed(server, tarball, tmp_path):
    body, sha256 = tarball
    server.route("/shapes.tgz", body)
    url = server.route("/latest/shapes.tgz", b"", redirect("/shapes.tgz"))
    assert_dataset(fetch(url, sha256, tmp_path))
    assert len(server.requests("/shapes.tgz")) == 1


def test_wrong_sha256_leaves_nothing(server, tarball, tmp_path):
    body, sha256 = tarball
    url = server.route("/shapes.tgz", body)
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        fetch(url, wrong, tmp_path)
    message = str(info.value)
    assert url in message and wrong in message and sha256 in message
    assert not (tmp_path / "raw").exists()
    assert cached(tmp_path, wrong) == []


def test_failure_keeps_previous_dest(server, tarball, tmp_path):
    body, sha256 = tarball
    previous = tmp_path / "raw" / "old"
    previous.mkdir(parents=True)
    url = server.route("/shapes.tgz", body, status(404))
    with pytest.raises(DownloadError):
        fetch(url, sha256, tmp_path)
    assert previous.is_dir()
    server.route("/shapes.tgz", body)
    assert_dataset(fetch(url, sha256, tmp_path))
    assert not previous.exists()


def test_connection_refused_is_retried_then_fails(tarball, tmp_path):
    _, sha256 = tarball
    with http_faults.FaultServer() as stopped:
        url = stopped.url("/shapes.tgz")  # a port nothing listens on once the server stops
    with pytest.raises(DownloadError, match=r"failed after 3 attempts \(last: cannot connect "
                                            r"\(\[Errno \d+\] Connection refused\)\)$"):
        fetch(url, sha256, tmp_path)



def test_password_and_query_values_stay_out_of_errors_and_logs(server, tarball, tmp_path,
                                                               caplog):
    body, sha256 = tarball
    plain = server.route("/shapes.tgz", body, status(500), status(404))
    url = plain.replace("http://", "http://alice:s3cret@") + "?X-Amz-Signature=deadbeef&dl=1"
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError) as info:
        fetch(url, sha256, tmp_path)
    shown = plain.replace("http://", "http://alice:***@") + "?X-Amz-Signature=***&dl=***"
    assert str(info.value) == f"HTTP 404 for {shown}"
    assert f"{shown}: HTTP 500; retrying" in caplog.text
    assert "s3cret" not in caplog.text and "deadbeef" not in caplog.text
    # The credentials were still used: requests turns the URL's user info into Basic auth.
    assert server.requests("/shapes.tgz")[0]["Authorization"].startswith("Basic ")




SIGNED_QUERY = ("?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY%2F20260101"
                "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600"
                "&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "ab12" * 16)


def test_long_signed_query_is_hidden_in_a_connection_error(tarball, tmp_path, caplog):
    # The error text of requests repeats the path and query, and is cut to one short line:
    # the tokens must be hidden before the cut, not matched afterwards.
    _, sha256 = tarball
    with http_faults.FaultServer() as stopped:
        url = stopped.url("/shapes.tgz") + SIGNED_QUERY
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError, match="cannot connect"
                                                         ) as info:
        fetch(url, sha256, tmp_path)
    shown = str(info.value) + caplog.text
    assert "AKIAEXAMPLEKEY" not in shown and "ab12ab12" not in shown
    assert "X-Amz-Credential=***" in shown


def test_password_in_an_unparseable_url_is_hidden(tarball, tmp_path):
    _, sha256 = tarball
    with pytest.raises(DownloadError, match="not a valid URL") as info:
        fetch("https://alice:s3cret@[::1/shapes.tgz", sha256, tmp_path)
    assert "s3cret" not in str(info.value) and "https://***@[::1" in str(info.value)


@pytest.mark.parametrize("url, shown", [
    ("https://alice:s3cret@host/a.tgz", "https://alice:***@host/a.tgz"),
    ("https://ghp_t0ken@host/a.tgz", "https://***@host/a.tgz"),  # a token as the user name
    ("https://host/a.tgz?sig=abc&dl=1", "https://host/a.tgz?sig=***&dl=***"),
    ("https://host/a.tgz", "https://host/a.tgz"),
    ("/data/a.tgz", "/data/a.tgz"),
    ("https://u:p@[bad/a.tgz?sig=abc", "https://***@[bad/a.tgz?sig=***"),  # unparseable
])
def test_redact(url, shown):
    assert redact(f"HTTP 404 for {url}", url) == f"HTTP 404 for {shown}"


def test_secrets_are_hidden_before_a_long_error_line_is_cut():
    from retrain.fetch import _first_line

    url = "https://host/a.tgz?token=" + "t0k" * 20
    error = ConnectionError("x" * (190 - len(url) + 60) + url)  # the token spans char 200
    line = _first_line(error, url)
    assert "t0k" not in line and line.endswith("token=***")


def test_netrc_authenticates_a_url_without_credentials(server, tarball, tmp_path, monkeypatch):
    body, sha256 = tarball
    url = server.route("/shapes.tgz", body)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert_dataset(fetch(url, sha256, tmp_path))
    assert server.requests("/shapes.tgz")[0]["Authorization"] == "Basic YWxpY2U6czNjcmV0"


# --------------------------------------------------------------------------- the cache


def test_cache_hit_needs_no_server(tarball, tmp_path):
    body, sha256 = tarball
    with http_faults.FaultServer() as server:
        url = server.route("/shapes.tgz", body)
        assert_dataset(fetch(url, sha256, tmp_path))
    shutil.rmtree(tmp_path / "raw")
    assert_dataset(fetch(url, sha256, tmp_path))  # the server is gone


def test_preseeded_cache_works_offline(tarball, tmp_path):
    body, sha256 = tarball
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / sha256).write_bytes(body)
    dataset = fetch("https://example.invalid/data/shapes.tgz", sha256, tmp_path)
    assert_dataset(dataset)


def test_a_local_archive_is_kept_for_workspaces_that_lack_it(tarball, tmp_path, monkeypatch):
    # A queued experiment's workspace holds what git tracks: not a relative data.url that git
    # ignores. The archive fetched once in the main workspace must still be found there.
    body, sha256 = tarball
    main, queued = tmp_path / "main", tmp_path / "queued"
    (main / "data").mkdir(parents=True)
    queued.mkdir()
    (main / "data" / "shapes.tgz").write_bytes(body)
    monkeypatch.chdir(main)
    cache = {"cache_dir": tmp_path / "cache"}
    assert_dataset(fetch("data/shapes.tgz", sha256, main, **cache))
    assert cached(tmp_path, sha256) == [sha256]
    monkeypatch.chdir(queued)
    assert_dataset(fetch("data/shapes.tgz", sha256, queued, **cache))
    # Another digest under the same name is still refused: the cache answers only by digest.
    with pytest.raises(DownloadError, match="file not found"):
        fetch("data/shapes.tgz", "0" * 64, queued, **cache)


def test_concurrent_fetches_of_one_archive_download_it_once(server, tarball, tmp_path):
    # Two experiments starting at once: the slow (trickling) download would be appended to
    # by both if nothing kept the second out of the partial file.
    from concurrent.futures import ThreadPoolExecutor

    from retrain.fetch import fetch_archive

    body, sha256 = tarball
    url = server.route("/shapes.tgz", body, trickle(0.0005), status(500))  # one good reply
    options = {**FAST, "timeout_s": 5, "cache_dir": tmp_path / "cache"}
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: fetch_archive(url, sha256, **options), range(2)))
    assert paths[0] == paths[1] and paths[0].read_bytes() == body
    assert server.range_headers("/shapes.tgz") == [None]
    assert cached(tmp_path, sha256) == [sha256]


def test_default_cache_dir_from_environment(server, tarball, tmp_path, monkeypatch):
    body, sha256 = tarball
    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path / "env-cache"))
    url = server.route("/shapes.tgz", body)
    fetch_dataset(url, sha256, tmp_path / "raw", **FAST)
    assert (tmp_path / "env-cache" / "downloads" / sha256).is_file()


def test_damaged_cache_entry_is_downloaded_again(server, tarball, tmp_path):
    body, sha256 = tarball
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / sha256).write_bytes(b"damaged")
    url = server.route("/shapes.tgz", body)
    assert_dataset(fetch(url, sha256, tmp_path))
    assert (downloads / sha256).read_bytes() == body


# (id, bytes of the .part file left by an earlier run, Range header of each request)
LEFTOVER_PARTS = [
    ("resumed", lambda body: body[:1000], ["bytes=1000-"]),
    ("already complete: 416", lambda body: body, ["bytes={size}-"]),
    ("stale, longer than the file: 416, restart", lambda body: body + b"junk",
     ["bytes={size}-", None]),
]


@pytest.mark.parametrize("make_part, ranges", [case[1:] for case in LEFTOVER_PARTS],
                         ids=[case[0] for case in LEFTOVER_PARTS])
def test_leftover_part_file(server, tarball, tmp_path, make_part, ranges):
    body, sha256 = tarball
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    part = make_part(body)
    (downloads / f"{sha256}.part").write_bytes(part)
    url = server.route("/shapes.tgz", body)
    assert_dataset(fetch(url, sha256, tmp_path))
    expected = [r.format(size=len(part)) if r else None for r in ranges]
    assert server.range_headers("/shapes.tgz") == expected


# --------------------------------------------------------------------------- local files


def test_plain_path_and_file_url(tarball, tmp_path, monkeypatch):
    body, sha256 = tarball
    archive = tmp_path / "my data.tgz"
    archive.write_bytes(body)
    assert_dataset(fetch(str(archive), sha256, tmp_path))
    assert_dataset(fetch(archive.as_uri(), sha256, tmp_path))  # file:///.../my%20data.tgz
    monkeypatch.chdir(tmp_path)
    assert_dataset(fetch("my data.tgz", sha256, tmp_path))
    # Read in place; the download cache keeps a hard link to it (same file system), no copy.
    assert cached(tmp_path, sha256) == [sha256]
    assert (tmp_path / "cache" / "downloads" / sha256).samefile(archive)


def test_local_file_with_wrong_sha256(tarball, tmp_path):
    body, _ = tarball
    archive = tmp_path / "shapes.tgz"
    archive.write_bytes(body)
    with pytest.raises(DownloadError, match="sha256 mismatch for .*shapes.tgz: expected 0{64}"):
        fetch(str(archive), "0" * 64, tmp_path)
    assert not (tmp_path / "raw").exists()


# (id, url, error pattern); {tmp} is the test's temporary folder.
BAD_URLS = [
    ("missing path", "{tmp}/nope.tgz", r"^{tmp}/nope\.tgz: file not found$"),
    ("missing file URL", "file://{tmp}/nope.tgz", r"^{tmp}/nope\.tgz: file not found$"),
    ("folder", "{tmp}", r"not a file"),
    ("file URL with a host", "file://server/share/x.tgz", r"remote host"),
    ("ftp", "ftp://example.com/x.tgz", r"^ftp://example\.com/x\.tgz: unsupported URL scheme"),
    ("s3", "s3://bucket/x.tgz", r"unsupported URL scheme 's3'"),
    ("https without host", "https:///x.tgz", r"^https:///x\.tgz: URL has no host$"),
    ("http without anything", "http://", r"URL has no host"),
]


@pytest.mark.parametrize("url, pattern", [case[1:] for case in BAD_URLS],
                         ids=[case[0] for case in BAD_URLS])
def test_bad_url(tarball, tmp_path, url, pattern):
    _, sha256 = tarball
    url = url.format(tmp=tmp_path)
    with pytest.raises(DownloadError, match=pattern.format(tmp=str(tmp_path))):
        fetch(url, sha256, tmp_path)
    assert not (tmp_path / "raw").exists()


def test_dataset_named_after_url_without_top_folder(server, tmp_path):
    path = write_dataset(tmp_path / "x.tgz", classes=2, per_class=2, size=32, top_folder=None)
    body = path.read_bytes()
    url = server.route("/files/my_set.tar.gz", body)
    dataset = fetch(url + "?download=1", hashlib.sha256(body).hexdigest(), tmp_path)
    assert dataset == tmp_path / "raw" / "my_set"


# --------------------------------------------------------------------------- stage script


def run_stage(tmp_path: Path, url: str, sha256: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(url=url, sha256=sha256)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "RETRAIN_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "raw",
                           "--layout", "layout.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_stage_reports_bad_url_in_one_line(tmp_path):
    result = run_stage(tmp_path, "ftp://example.com/x.tgz", "0" * 64)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ftp://example.com/x.tgz: unsupported URL scheme")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "raw").exists()


def test_stage_summary(tarball, tmp_path):
    body, sha256 = tarball
    (tmp_path / "shapes.tgz").write_bytes(body)
    result = run_stage(tmp_path, "shapes.tgz", sha256)
    assert result.returncode == 0, result.stderr
    counts = ", ".join(f"class_{i:03d} {PER_CLASS}" for i in range(CLASSES))
    assert result.stdout.splitlines() == [
        "fetch: read shapes.tgz as class folders under shapes/ (data.layout: auto)",
        f"fetch:   classes ({CLASSES}): {counts}",
        "fetch:   set aside as unlabeled: nothing",
        f"fetch: shapes: {CLASSES} classes in raw/shapes; the reading is in layout.json"]

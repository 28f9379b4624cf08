"""Get the dataset archive named by `data.url`, check its sha256, and extract it safely.

Where the archive comes from:
- `https://` or `http://`: streamed with requests into a download cache outside the
  workspace, `<cache>/downloads/<sha256>`, where `<cache>` is `$RETRAIN_CACHE` or
  `~/.cache/retrain`. The cache is keyed by the expected digest, so the same bytes are never
  downloaded twice whatever URL or workspace names them, and a file that changed on the
  server can never pass for the cached one. An interrupted download stays as
  `<sha256>.part` and the next attempt (or the next run) resumes it with an HTTP Range
  request. Transient failures (connection errors and resets, a stalled or trickling server,
  HTTP 5xx and 429) are retried `retries` times with exponential backoff; other HTTP errors
  (404, 403, ...) fail at once.
- `file://` or a plain local path: checked and read in place. A hard link to it (a copy
  where the cache is on another file system) is kept as `<cache>/downloads/<sha256>`, so a
  workspace that lacks the file (a `dvc exp run --queue` workspace holds only what git
  tracks, not a relative `data.url` that git ignores) still finds the same bytes there.

Offline use: copy the archive to `<cache>/downloads/<sha256>` (for the default dataset,
`~/.cache/retrain/downloads/4c54ace7...` with the full digest from params.yaml); a file there
whose digest matches is used without touching the network.

Extraction and the output layout are described in retrain.archive.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from filelock import FileLock
from tqdm import tqdm

from retrain.archive import archive_stem, extract_dataset
from retrain.cache import user_cache_dir
from retrain.errors import DownloadError, UserError, first_line
from retrain.layout import Reading
from retrain.urls import redact

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Fewer bytes than this in `timeout_s` seconds counts as a stall, so a server that trickles a
# byte now and then cannot hold a download open forever (the socket timeout never fires).
STALL_BYTES = 1024
MAX_BACKOFF_S = 30.0
HEADERS = {
    "User-Agent": "retrain-fetch/0.1",
    # The digest is of the file's bytes: ask the server not to re-encode them in transit.
    "Accept-Encoding": "identity",
}


# Network failures worth another attempt (requests wraps most; urllib3 raises its own while
# the body streams).
TRANSIENT_ERRORS = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, ConnectionResetError, ConnectionAbortedError, TimeoutError,
)


class _Transient(Exception):
    """A failure worth another attempt; `wait` is the server's Retry-After, if any."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


def fetch_dataset(
    url: str,
    sha256: str,
    dest_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    timeout_s: float = 60,
    retries: int = 5,
    max_members: int = 1_000_000,
    max_extracted_bytes: float = 20e9,
    backoff_s: float = 1.0,
    layout: str = "auto",
    unlabeled: tuple[str, ...] | list[str] = (),
) -> tuple[Path, Reading]:
    """Fetch and verify the archive at `url`, extract it to `dest_dir/<dataset_name>/<class>/`,
    and return that dataset folder with its layout reading (retrain.layout; `layout` and
    `unlabeled` are `data.layout` and `data.unlabeled`). `dest_dir` appears whole or not at
    all.

    Raises DownloadError (URL, HTTP status, network, digest) or DataError (archive content),
    each with a one-line message. `backoff_s` is the wait before the first retry, doubled for
    each one after (at most 30 s; a server's Retry-After takes precedence).
    """
    archive = fetch_archive(url, sha256, cache_dir=cache_dir, timeout_s=timeout_s,
                            retries=retries, backoff_s=backoff_s)
    with _secrets_hidden(url):
        return extract_dataset(archive, dest_dir, name=archive_stem(_url_path(url)),
                               label=url, max_members=max_members,
                               max_extracted_bytes=max_extracted_bytes, layout=layout,
                               unlabeled=unlabeled)


def fetch_archive(
    url: str,
    sha256: str,
    *,
    cache_dir: str | Path | None = None,
    timeout_s: float = 60,
    retries: int = 5,
    backoff_s: float = 1.0,
) -> Path:
    """A local file holding exactly the bytes with digest `sha256`: the file itself for a
    local path, the cached download for http(s)."""
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    with _secrets_hidden(url):
        downloads = Path(cache_dir) / "downloads" if cache_dir else user_cache_dir("downloads")
        downloads.mkdir(parents=True, exist_ok=True)
        local = local_path(url)
        if local is not None:
            return _local_archive(local, sha256, url, downloads)
        return _cached_download(url, sha256, downloads, timeout_s=timeout_s, retries=retries,
                                backoff_s=backoff_s)


@contextmanager
def _secrets_hidden(url: str) -> Iterator[None]:
    """Re-raise a UserError with `url`'s secrets redacted from its message."""
    try:
        yield
    except UserError as exc:
        raise type(exc)(redact(str(exc), url)) from None


def local_path(url: str) -> Path | None:
    """The file a `file://` URL or plain path names; None for http(s). DownloadError for
    anything else, so a typo in the scheme fails here rather than as a missing file."""
    if "://" not in url:
        return Path(url).expanduser()
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise DownloadError(f"{url}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise DownloadError(f"{url}: URL has no host")
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: file:// URL names a remote host; use file:///path")
        return Path(url2pathname(parts.path))
    raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} "
                        "(use https://, http://, file:// or a local path)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _url_path(url: str) -> str:
    return unquote(urlsplit(url).path) if "://" in url else url


def _local_archive(path: Path, sha256: str, url: str, downloads: Path) -> Path:
    """The local archive, checked, and remembered in the download cache; the cached copy
    where the file is not here (a queued experiment's workspace)."""
    kept = downloads / sha256
    if not path.exists() and kept.is_file() and file_sha256(kept) == sha256:
        log.info("%s is not in this workspace: using the download cache's copy %s", path, kept)
        return kept
    archive = _verified_local(path, sha256, url)
    if not kept.is_file():
        _remember(archive, kept)
    return archive


def _remember(archive: Path, kept: Path) -> None:
    """Link (else copy) `archive` to `kept`, atomically; a cache that cannot be written
    costs only the fallback, never the run."""
    part = kept.with_name(f"{kept.name}.{os.getpid()}.link")
    try:
        try:
            os.link(archive, part)
        except OSError:
            shutil.copyfile(archive, part)
        os.replace(part, kept)
    except OSError as exc:
        log.warning("could not keep %s in the download cache (%s)", archive, exc)
        part.unlink(missing_ok=True)


def _verified_local(path: Path, sha256: str, url: str) -> Path:
    if not path.exists():
        raise DownloadError(f"{path}: file not found")
    if not path.is_file():
        raise DownloadError(f"{path}: not a file (expected a .tgz/.tar/.zip archive)")
    actual = file_sha256(path)
    if actual != sha256:
        raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}")
    return path


# ---------------------------------------------------------------------------- http(s)


def _cached_download(url: str, sha256: str, downloads: Path, *, timeout_s: float,
                     retries: int, backoff_s: float) -> Path:
    # One writer per digest: queued experiments (or two workspaces) fetching the same new
    # archive at once would otherwise append to the same partial file. The second waits,
    # then finds the finished download in the cache.
    with FileLock(downloads / f".{sha256}.lock"):
        return _download_once(url, sha256, downloads, timeout_s=timeout_s, retries=retries,
                              backoff_s=backoff_s)


def _download_once(url: str, sha256: str, downloads: Path, *, timeout_s: float,
                   retries: int, backoff_s: float) -> Path:
    final = downloads / sha256
    if final.is_file():
        if file_sha256(final) == sha256:
            return final
        log.warning("cached %s is damaged; downloading it again", final)
        final.unlink()
    part = downloads / f"{sha256}.part"
    _download_with_retries(url, part, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    actual = file_sha256(part)
    if actual != sha256:
        part.unlink()
        raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}")
    os.replace(part, final)
    return final


def _download_with_retries(url: str, part: Path, *, timeout_s: float, retries: int,
                           backoff_s: float) -> None:
    with requests.Session() as session:
        session.headers.update(HEADERS)
        attempt = 0
        while True:
            try:
                return _attempt(session, url, part, timeout_s)
            except (requests.exceptions.SSLError, urllib3.exceptions.SSLError) as exc:
                raise DownloadError(f"{url}: TLS error ({_first_line(exc, url)})") from None
            except _Transient as exc:
                reason, wait = str(exc), exc.wait
            except TRANSIENT_ERRORS as exc:
                reason, wait = _describe(exc, timeout_s, url), None
            except requests.RequestException as exc:  # invalid URL, too many redirects, ...
                raise DownloadError(f"{url}: {_first_line(exc, url)}") from None
            except OSError as exc:  # the local disk, not the network: retrying will not help
                raise DownloadError(f"{url}: cannot save to {part} ({exc})") from None
            attempt += 1
            if attempt > retries:
                tries = f"{attempt} attempt" + ("s" if attempt > 1 else "")
                raise DownloadError(f"{url}: download failed after {tries} (last: {reason})")
            wait = min(wait if wait is not None else backoff_s * 2 ** (attempt - 1),
                       MAX_BACKOFF_S)
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", redact(url, url),
                        redact(reason, url), wait, attempt, retries)
            time.sleep(wait)


def _attempt(session: requests.Session, url: str, part: Path, timeout_s: float) -> None:
    """One GET that appends to `part` from where it stops, or starts over if it must."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)) as resp:
        start = _resume_point(resp, url, part, offset)
        if start is not None:
            _save_body(resp, part, start, timeout_s)


def _resume_point(resp: requests.Response, url: str, part: Path, offset: int) -> int | None:
    """Where the response body goes in `part`; None if `part` is already complete."""
    code = resp.status_code
    if code == 200:
        return 0  # a fresh download, or a server that ignores Range: start over
    if code == 206:
        first, _ = _content_range(resp)
        if first == offset:
            return offset
        part.unlink(missing_ok=True)
        raise _Transient(f"server resumed at byte {first}, not {offset}; starting over")
    if code == 416 and offset:
        _, total = _content_range(resp)
        if total == offset:
            return None
        part.unlink(missing_ok=True)  # stale partial file, larger than the archive
        raise _Transient("server refused to resume the partial download; starting over")
    if code == 429 or code >= 500:
        raise _Transient(f"HTTP {code}", _retry_after(resp))
    raise DownloadError(f"HTTP {code} for {url}")


def _save_body(resp: requests.Response, part: Path, start: int, timeout_s: float) -> None:
    length = resp.headers.get("Content-Length", "")
    total = start + int(length) if length.isdigit() else None
    stall = _StallWatch(timeout_s)
    with open(part, "ab" if start else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
        desc=Path(urlsplit(resp.url).path).name or "download", disable=None,
    ) as bar:
        for chunk in _body_chunks(resp):
            out.write(chunk)
            bar.update(len(chunk))
            stall.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:  # urllib3 2 raises first; older ones may not
        raise _Transient(f"connection closed after {size:,} of {total:,} bytes")


def _body_chunks(resp: requests.Response):
    """The body as it arrives, undecoded. `read1` returns whatever one socket read gives, so a
    trickle of bytes reaches the stall check; iter_content would wait to fill each chunk."""
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2: stall detection relies on the socket timeout only
        yield from resp.raw.stream(CHUNK_BYTES, decode_content=False)
        return
    while chunk := read1(CHUNK_BYTES, decode_content=False):
        yield chunk


class _StallWatch:
    """Fails an attempt that receives fewer than STALL_BYTES in any `window_s` seconds."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.start = time.monotonic()
        self.received = 0

    def update(self, count: int) -> None:
        self.received += count
        elapsed = time.monotonic() - self.start
        if elapsed < self.window_s:
            return
        if self.received < STALL_BYTES:
            raise _Transient(f"stalled: {self.received} bytes in {elapsed:.1f} s")
        self.start, self.received = time.monotonic(), 0


def _content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total size) from `Content-Range: bytes 100-199/200` or `bytes */200`."""
    value = resp.headers.get("Content-Range", "")
    _unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    first = span.split("-")[0]
    return (int(first) if first.isdigit() else None,
            int(total) if total.isdigit() else None)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: BaseException, timeout_s: float, url: str) -> str:
    """A short reason for the retry log and the final error, not a nested urllib3 repr."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"no data for {timeout_s:g} s"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ProtocolError)):
        return "connection closed mid-download"
    if isinstance(exc, requests.ConnectionError):
        # requests nests urllib3's errors; the OS's reason is what a user can act on.
        errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", str(exc))
        return f"cannot connect ({errno.group().strip() if errno else _first_line(exc, url)})"
    return _first_line(exc, url)


def _first_line(exc: BaseException, url: str) -> str:
    """The exception's first line, with `url`'s secrets hidden before it is cut (cutting first
    could leave half a token that no longer matches)."""
    return first_line(redact(str(exc), url) or type(exc).__name__)

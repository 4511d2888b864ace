"""``robustprune download NAME``: fetch a dataset's files from its publisher into the data root, verified.

What lands where (the layout the readers in this package expect, DESIGN.md §3)::

    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz     publisher's gzipped IDX files
    <root>/fashion-mnist/  (the same four names)
    <root>/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta,readme.html}
    <root>/svhn/{train,test}_32x32.mat

:data:`SOURCES` is the one table of publisher URLs (first URL tried first, the others are fallbacks), pinned
checksums written ``"md5:<hex>"`` / ``"sha256:<hex>"`` so the algorithm is explicit, and sizes. The MD5s are the
publishers' (also pinned by torchvision); MD5 is only an integrity check here, the URLs and pins are the trust root.
MNIST's ``content`` pins are SHA-256 digests of the *decompressed* IDX files: a ``.gz`` that was re-compressed
elsewhere (another mtime in its header) still counts as present when its contents are the canonical ones.

Safety rules:

* Only ``http``/``https`` URLs are fetched (the table, ``$ROBUSTPRUNE_MIRROR`` and ``mirror=`` alike), and redirects
  may not leave those schemes.
* A file is streamed into a temporary file beside its final name, hashed while streaming, checked against the
  announced length, the pinned size and the pinned checksum, fsync'ed, then ``os.replace``-d into place: a final
  name only ever holds a verified file. On any failure the temporary file is removed and a :class:`UserError` names
  the URL and what went wrong; files already verified stay.
* A present file is hashed first: correct → kept and not fetched again; wrong → fetched again, never trusted.
* The CIFAR-10 archive is extracted by ``archive.py``: every member is checked *before* anything is written
  (absolute names, ``..``, names resolving outside the target, links, devices and FIFOs are refused), then the
  regular files and folders go into a temporary folder that is moved into place once the extracted batches match
  their pinned checksums. The archive (170 MB) is then deleted: the extracted batches are pinned too, so a later run
  still knows they are complete.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import http.client
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from robustprune.data.archive import extract_tar_gz
from robustprune.infra.errors import UserError, one_line
from robustprune.infra.fileio import fsync_folder

CHUNK = 1 << 20
TIMEOUT_S = 60.0
HEX_LENGTH = {"md5": 32, "sha256": 64}
MIRROR_ENV = "ROBUSTPRUNE_MIRROR"


@dataclass(frozen=True)
class Remote:
    """One published file: its name (also its name on disk), where to get it and how to know it is the right one."""

    name: str
    urls: tuple[str, ...]  # tried in order; the first is the publisher's (or torchvision's) primary location
    checksum: str  # "md5:<hex>" or "sha256:<hex>" of the file as published
    size: int | None = None  # bytes as published, when known
    content: str | None = None  # checksum of the gunzipped bytes, for .gz files that may be re-compressed elsewhere
    members: tuple[tuple[str, str], ...] = ()  # a tar.gz to extract: (path under the folder, checksum) it must yield


@dataclass(frozen=True)
class Source:
    """What one dataset needs under the data root: its folder (as its reader expects) and its files."""

    folder: str
    files: tuple[Remote, ...]


def _mirrored(bases: tuple[str, ...], name: str) -> tuple[str, ...]:
    return tuple(base + name for base in bases)


MNIST_BASES = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_BASES = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"

SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", (
        Remote("train-images-idx3-ubyte.gz", _mirrored(MNIST_BASES, "train-images-idx3-ubyte.gz"),
               "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422,
               content="sha256:ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        Remote("train-labels-idx1-ubyte.gz", _mirrored(MNIST_BASES, "train-labels-idx1-ubyte.gz"),
               "md5:d53e105ee54ea40749a09fcbcd1e9432", 28881,
               content="sha256:65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        Remote("t10k-images-idx3-ubyte.gz", _mirrored(MNIST_BASES, "t10k-images-idx3-ubyte.gz"),
               "md5:9fb629c4189551a2d022fa330f9573f3", 1648877,
               content="sha256:0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        Remote("t10k-labels-idx1-ubyte.gz", _mirrored(MNIST_BASES, "t10k-labels-idx1-ubyte.gz"),
               "md5:ec29112dd5afa0611ce80d1b7f02629c", 4542,
               content="sha256:ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    )),
    "fashion-mnist": Source("fashion-mnist", (
        Remote("train-images-idx3-ubyte.gz", _mirrored(FASHION_BASES, "train-images-idx3-ubyte.gz"),
               "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
        Remote("train-labels-idx1-ubyte.gz", _mirrored(FASHION_BASES, "train-labels-idx1-ubyte.gz"),
               "md5:25c81989df183df01b3e8a0aad5dffbe", 29515),
        Remote("t10k-images-idx3-ubyte.gz", _mirrored(FASHION_BASES, "t10k-images-idx3-ubyte.gz"),
               "md5:bef4ecab320f06d8554ea6380940ec79", 4422102),
        Remote("t10k-labels-idx1-ubyte.gz", _mirrored(FASHION_BASES, "t10k-labels-idx1-ubyte.gz"),
               "md5:bb300cfdad3c16e7a12a480ee83cd310", 5148),
    )),
    "cifar10": Source("cifar10", (
        Remote("cifar-10-python.tar.gz", (CIFAR10_URL,), "md5:c58f30108f718f92721af3b95e74349a", 170498071,
               members=(("cifar-10-batches-py/data_batch_1", "md5:c99cafc152244af753f735de768cd75f"),
                        ("cifar-10-batches-py/data_batch_2", "md5:d4bba439e000b95fd0a9bffe97cbabec"),
                        ("cifar-10-batches-py/data_batch_3", "md5:54ebc095f3ab1f0389bbae665268c751"),
                        ("cifar-10-batches-py/data_batch_4", "md5:634d18415352ddfa80567beed471001a"),
                        ("cifar-10-batches-py/data_batch_5", "md5:482c414d41f54cd18b22e5b47cb7c3cb"),
                        ("cifar-10-batches-py/test_batch", "md5:40351d587109b95175f43aff81a1287e"))),
    )),
    "svhn": Source("svhn", (
        Remote("train_32x32.mat", (SVHN_BASE + "train_32x32.mat",), "md5:e26dedcc434d2e4c54c9b2d4a06d8373", 182040794),
        Remote("test_32x32.mat", (SVHN_BASE + "test_32x32.mat",), "md5:eb5a983be6a315427106f1b164d9cef3", 64275384),
    )),
}


class _TransferFailed(UserError):
    """One URL did not give the pinned file (HTTP, network, size or checksum): the next URL may still work."""


# ------------------------------------------------------------------------------------------------ public entry


def download(name: str, root: Path, quiet: bool = False, mirror: str | None = None) -> Path:
    """Make ``root/<folder>`` hold ``name``'s verified files, fetching only what is missing or wrong.

    ``mirror`` (else ``$ROBUSTPRUNE_MIRROR``) replaces every URL by ``<mirror>/<file name>``, for mirrors and tests.
    Returns the dataset folder. ``quiet`` silences progress bars and status lines (errors are still raised).
    """
    source = _source(name)
    base = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if base is not None:
        _check_url(base, what="mirror")
    folder = Path(root).expanduser() / source.folder
    say = _sayer(name, quiet)
    for remote in source.files:
        urls = (base.rstrip("/") + "/" + remote.name,) if base is not None else remote.urls
        try:
            _ensure(remote, folder, urls, quiet, say)
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    return folder


def _source(name: str) -> Source:
    """The table entry for ``name``, or a UserError that suggests the closest valid name."""
    if name in SOURCES:
        return SOURCES[name]
    names = sorted(SOURCES)
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"cannot download dataset {name!r}{hint} (choose from: {', '.join(names)})")


def _sayer(name: str, quiet: bool) -> Callable[[str], None]:
    """Status lines go to stderr so stdout keeps only the command's result (the folder)."""
    def say(message: str) -> None:
        if not quiet:
            print(f"{name}: {message}", file=sys.stderr, flush=True)
    return say


def _check_url(url: str, what: str = "URL") -> None:
    """Refuse anything but http(s) with a host: file://, ftp://, data: ... could read or write local things."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise UserError(f"{what} {url!r} refused: only http:// and https:// URLs are accepted")


# ------------------------------------------------------------------------------------------------ one file


def _ensure(remote: Remote, folder: Path, urls: tuple[str, ...], quiet: bool, say: Callable[[str], None]) -> None:
    """Leave ``remote`` verified in ``folder`` (extracted, for an archive), fetching it only when needed."""
    if remote.members and _members_ok(folder, remote.members):
        say(f"{remote.name}: already extracted and verified in {folder}")
        return
    dest = folder / remote.name
    if dest.is_file() and _present_ok(dest, remote):
        say(f"{dest}: already present and verified, not downloaded again")
    else:
        if dest.exists():
            say(f"{dest}: present but its checksum does not match; downloading it again")
        _make_folder(folder)
        _fetch_any(remote, urls, dest, quiet, say)
    if remote.members:
        _extract(dest, folder, remote.members)
        dest.unlink()
        say(f"{remote.name}: extracted and verified; archive deleted")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data folder {folder} ({exc.strerror or exc})") from None


def _fetch_any(remote: Remote, urls: tuple[str, ...], dest: Path, quiet: bool, say: Callable[[str], None]) -> None:
    """Try each URL in turn; fail with every URL's reason on one line when none gives the pinned file."""
    failures = []
    for url in urls:
        say(f"downloading {url}")
        try:
            _fetch(url, dest, remote, quiet)
            return
        except _TransferFailed as exc:
            failures.append(str(exc))
            if url != urls[-1]:
                say(f"{exc}; trying the next location")
    raise UserError(f"could not download {remote.name}: " + "; ".join(failures))


def _fetch(url: str, dest: Path, remote: Remote, quiet: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, verify it, then atomically move it to ``dest``."""
    _check_url(url)
    algorithm, expected = _parse_checksum(remote.checksum)
    digest = hashlib.new(algorithm, usedforsecurity=False)
    tmp = _temp_file(dest)
    try:
        with open(tmp, "wb") as out:
            with _open(url) as response:
                announced = _announced_length(response, url, remote.size)
                limit = announced if announced is not None else remote.size
                received = 0
                for chunk in _chunks(response, url, limit, remote.name, quiet):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        _check_received(url, received, announced, remote.size)
        if digest.hexdigest() != expected:
            raise _TransferFailed(f"{url}: checksum mismatch: expected {algorithm} {expected}, "
                                  f"got {digest.hexdigest()} (file not kept)")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(dest.parent)


def _temp_file(dest: Path) -> Path:
    """A fresh hidden file beside ``dest`` (same file system, so the final rename is atomic)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise UserError(f"cannot write into the data folder {dest.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    return Path(name)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): a server must not be able to send us to file:// or ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's signature
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise _TransferFailed(f"{req.full_url}: redirect to {newurl!r} refused (only http/https)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str) -> http.client.HTTPResponse:
    """GET ``url``; HTTP and network failures become a one-line _TransferFailed naming the URL."""
    from robustprune.infra.version import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"robustprune/{__version__}"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    try:
        return opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise _TransferFailed(f"{url}: HTTP error {exc.code} ({one_line(exc.reason)})") from None
    except urllib.error.URLError as exc:
        raise _TransferFailed(f"{url}: network error ({one_line(exc.reason)})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _TransferFailed(f"{url}: network error ({type(exc).__name__}: {one_line(exc)})") from None


def _announced_length(response: http.client.HTTPResponse, url: str, size: int | None) -> int | None:
    """The server's Content-Length; refuse early when it contradicts the pinned size (wrong file, save the bytes)."""
    value = response.headers.get("Content-Length")
    announced = int(value) if value and value.strip().isdigit() else None
    if announced is not None and size is not None and announced != size:
        raise _TransferFailed(f"{url}: server announces {announced} bytes but the pinned file has {size}")
    return announced


def _chunks(response, url: str, limit: int | None, label: str, quiet: bool) -> Iterator[bytes]:
    """The body in chunks, with a progress bar; read errors and bodies longer than ``limit`` are failures."""
    from tqdm.auto import tqdm

    bar = tqdm(total=limit, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
               disable=quiet or not sys.stderr.isatty())
    received = 0
    try:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # IncompleteRead, reset, timeout
                raise _TransferFailed(f"{url}: transfer interrupted after {received} bytes "
                                      f"({type(exc).__name__}: {one_line(exc)})") from None
            if not chunk:
                return
            received += len(chunk)
            if limit is not None and received > limit:
                raise _TransferFailed(f"{url}: server sent more than the expected {limit} bytes")
            bar.update(len(chunk))
            yield chunk
    finally:
        bar.close()


def _check_received(url: str, received: int, announced: int | None, size: int | None) -> None:
    for expected in (announced, size):
        if expected is not None and received != expected:
            raise _TransferFailed(f"{url}: transfer truncated: received {received} of {expected} bytes")


# ------------------------------------------------------------------------------------------------ checksums


def _parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:<hex>"`` → ("md5", "<hex>"), refusing unknown algorithms and wrong lengths (a typo in the table)."""
    algorithm, _, hexdigest = checksum.partition(":")
    if algorithm not in HEX_LENGTH or len(hexdigest) != HEX_LENGTH[algorithm]:
        raise ValueError(f"bad pinned checksum {checksum!r}: expected md5:<32 hex> or sha256:<64 hex>")
    int(hexdigest, 16)
    return algorithm, hexdigest.lower()


def file_checksum(path: Path, algorithm: str, gunzip: bool = False) -> str:
    """Hex digest of a file (or of its gunzipped bytes), read in chunks so big files need little memory."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, checksum: str, gunzip: bool = False) -> bool:
    """Whether ``path`` has ``checksum``; an unreadable or corrupt file simply does not match."""
    algorithm, expected = _parse_checksum(checksum)
    try:
        return file_checksum(path, algorithm, gunzip) == expected
    except (OSError, EOFError, zlib.error):
        return False


def _present_ok(path: Path, remote: Remote) -> bool:
    """A present file counts when it is the published file, or (``content`` pin) a re-compression of it."""
    if _matches(path, remote.checksum):
        return True
    return remote.content is not None and _matches(path, remote.content, gunzip=True)


def _members_ok(folder: Path, members: tuple[tuple[str, str], ...]) -> bool:
    return all((folder / rel).is_file() and _matches(folder / rel, checksum) for rel, checksum in members)


# ------------------------------------------------------------------------------------------------ archives


def _extract(archive: Path, folder: Path, members: tuple[tuple[str, str], ...]) -> None:
    """Safe extraction (``archive.py``) with the pinned members verified before they are moved into place; a refused
    or unreadable archive is deleted (the next run fetches it again)."""
    try:
        extract_tar_gz(archive, folder, lambda staging: _verify_members(staging, members, archive))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        archive.unlink(missing_ok=True)
        raise UserError(f"{archive}: not a readable tar.gz archive ({one_line(exc)}); archive deleted") from None
    except UserError as exc:
        archive.unlink(missing_ok=True)
        raise UserError(f"{exc}; archive deleted") from None


def _verify_members(staging: Path, members: tuple[tuple[str, str], ...], archive: Path) -> None:
    for rel, checksum in members:
        if not (staging / rel).is_file():
            raise UserError(f"{archive}: the archive does not contain {rel}")
        if not _matches(staging / rel, checksum):
            raise UserError(f"{archive}: extracted {rel} does not match its pinned checksum {checksum}")

"""``robustprune download``: a local HTTP server serves small files the test makes; the real URLs are never fetched.

The checksum table is monkeypatched so the test files are "pinned". Covered: good IDX files (then loadable), a good
CIFAR-10 archive (extracted, verified, loadable), checksum mismatch, truncated transfer, 404, fallback URLs,
already-present files not re-fetched, wrong present files re-fetched, $ROBUSTPRUNE_MIRROR, non-http URLs refused,
hostile archives (``..``, absolute path, symlink, hardlink, FIFO) refused with nothing written, and the real table.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from robustprune.cli import main
from robustprune.data import load_dataset
from robustprune.data import download as dl
from robustprune.infra.errors import UserError

SHARED_DATA = Path(os.environ.get("ROBUSTPRUNE_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
UNREACHABLE = "http://127.0.0.1:9/nothing-here/"  # the discard port: connection refused at once
RNG = np.random.default_rng(0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ local server


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; ``/trunc/NAME`` announces the full length but sends half; ``/missing/NAME`` is a 404."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append(self.path)
        if self.path.startswith("/missing/"):
            self.send_error(404, "Not Found")
        elif self.path.startswith("/trunc/"):
            data = (Path(self.directory) / self.path.removeprefix("/trunc/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) serving ``folder``; counts requests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.httpd.requests = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``name``; returns its URL."""
        (self.folder / name).write_bytes(data)
        return f"{self.url}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # never send 127.0.0.1 to a proxy from the environment
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    s = Server(served)
    yield s
    s.close()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["download", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustprune: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a failed run must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ test files


def idx_files(n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    """Four valid, gzipped tiny MNIST-format files (28x28 images, labels 0..9)."""
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
            (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + images.tobytes())
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
            (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return files


def serve_mnist(server: Server, monkeypatch, files: dict[str, bytes], bases: tuple[str, ...] | None = None,
                pins: dict[str, str] | None = None) -> None:
    """Serve ``files`` and pin them as the mnist entry (URLs under ``bases``, default the server's root)."""
    bases = bases or (server.url + "/",)
    for name, data in files.items():
        server.add(name, data)
    remotes = tuple(dl.Remote(name, tuple(b + name for b in bases), (pins or {}).get(name, sha256(data)), len(data))
                    for name, data in files.items())
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", remotes))


def cifar_batch(n: int) -> bytes:
    """One CIFAR-10 batch as the publisher wrote it: a protocol-2 pickle of a dict with bytes keys."""
    batch = {b"batch_label": b"test batch", b"labels": RNG.integers(0, 10, size=n).tolist(),
             b"data": RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(batch, protocol=2)


def tar_gz(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A tar.gz of (name, data) regular files and ready-made TarInfo headers (links, FIFOs, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def good_cifar() -> tuple[bytes, dict[str, bytes]]:
    batches = {f"cifar-10-batches-py/{name}": cifar_batch(3 if name == "test_batch" else 2) for name in CIFAR_BATCHES}
    folder = tarfile.TarInfo("cifar-10-batches-py")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    meta = ("cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    return tar_gz([folder, *batches.items(), meta]), batches


def pin_cifar(server: Server, monkeypatch, archive: bytes, batches: dict[str, bytes]) -> None:
    url = server.add("cifar-10-python.tar.gz", archive)
    members = tuple((rel, sha256(data)) for rel, data in batches.items())
    monkeypatch.setitem(dl.SOURCES, "cifar10", dl.Source("cifar10", (
        dl.Remote("cifar-10-python.tar.gz", (url,), sha256(archive), len(archive), members=members),)))


# ------------------------------------------------------------------------------------------------ the real table


def test_table_covers_the_four_datasets_with_http_urls_and_well_formed_checksums():
    assert set(dl.SOURCES) == {"mnist", "fashion-mnist", "cifar10", "svhn"}
    for name, source in dl.SOURCES.items():
        assert source.folder == name  # the folder each reader expects under the root
        for remote in source.files:
            assert remote.urls and all(u.startswith(("http://", "https://")) for u in remote.urls), remote
            assert all(u.endswith("/" + remote.name) for u in remote.urls), remote
            for checksum in [remote.checksum, remote.content, *(c for _, c in remote.members)]:
                if checksum is not None:
                    algorithm, hexdigest = checksum.split(":")
                    assert len(hexdigest) == dl.HEX_LENGTH[algorithm] and int(hexdigest, 16) >= 0, checksum
    assert [r.name for r in dl.SOURCES["mnist"].files] == IDX_NAMES
    assert [r.name for r in dl.SOURCES["fashion-mnist"].files] == IDX_NAMES
    assert {rel for rel, _ in dl.SOURCES["cifar10"].files[0].members} == {
        f"cifar-10-batches-py/{b}" for b in CIFAR_BATCHES}
    assert [r.name for r in dl.SOURCES["svhn"].files] == ["train_32x32.mat", "test_32x32.mat"]


# MD5s of the *decompressed* canonical MNIST files, as published alongside the dataset by many projects.
CANONICAL_MNIST_IDX_MD5 = {"train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
                           "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
                           "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
                           "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637"}


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                    reason=f"real MNIST not found at {SHARED_DATA / 'mnist'} (set $ROBUSTPRUNE_DATA to a folder "
                           "holding mnist/)")
def test_pinned_mnist_checksums_match_the_shared_files(monkeypatch):
    """The shared .gz files were re-compressed, so their own MD5 differs from the publisher's; their contents match."""
    for remote in dl.SOURCES["mnist"].files:
        path = SHARED_DATA / "mnist" / remote.name
        assert dl.file_checksum(path, "md5", gunzip=True) == CANONICAL_MNIST_IDX_MD5[remote.name]
        assert "sha256:" + dl.file_checksum(path, "sha256", gunzip=True) == remote.content, remote.name
        if dl.file_checksum(path, "md5") == remote.checksum.split(":")[1]:
            assert remote.size == path.stat().st_size
    # everything verified in place: no fetch at all (the mirror is unreachable) and nothing written
    monkeypatch.setenv("no_proxy", "*")
    assert dl.download("mnist", SHARED_DATA, quiet=True, mirror=UNREACHABLE) == SHARED_DATA / "mnist"


# ------------------------------------------------------------------------------------------------ good downloads


def test_mnist_download_verifies_places_and_loads(server, monkeypatch, tmp_path, capsys):
    files = idx_files()
    serve_mnist(server, monkeypatch, files)
    root = tmp_path / "root"
    code, out, err = run_cli(capsys, "mnist", "--root", str(root))
    assert code == 0, err
    assert out.strip() == f"mnist: {root / 'mnist'}"
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(files)
    for name, data in files.items():
        assert (root / "mnist" / name).read_bytes() == data
    ds = load_dataset("mnist", root)
    assert (len(ds.train), len(ds.test)) == (6, 4) and ds.input_shape == (1, 28, 28)
    raw = np.frombuffer(gzip.decompress(files["train-images-idx3-ubyte.gz"]), np.uint8, offset=16)
    assert torch.equal(ds.train.x.flatten(), torch.from_numpy(raw.astype(np.float32)) / 255.0)
    assert len(server.requests) == 4


def test_present_verified_files_are_not_fetched_again(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files())
    root = tmp_path / "root"
    assert dl.download("mnist", root, quiet=True) == root / "mnist"
    assert len(server.requests) == 4
    code, _, err = run_cli(capsys, "mnist", "--root", str(root))
    assert code == 0 and len(server.requests) == 4, err
    assert err.count("already present and verified") == 4, err


def test_present_file_with_wrong_checksum_is_fetched_again(server, monkeypatch, tmp_path):
    files = idx_files()
    serve_mnist(server, monkeypatch, files)
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / IDX_NAMES[0]).write_bytes(b"stale or tampered")
    dl.download("mnist", tmp_path / "root", quiet=True)
    assert server.requests == [f"/{IDX_NAMES[0]}"]
    assert (folder / IDX_NAMES[0]).read_bytes() == files[IDX_NAMES[0]]


def test_recompressed_gz_with_pinned_content_counts_as_present(server, monkeypatch, tmp_path):
    """A .gz re-compressed elsewhere (other header bytes) is accepted when its gunzipped content is pinned."""
    files = idx_files()
    serve_mnist(server, monkeypatch, files)
    remotes = tuple(dl.Remote(r.name, r.urls, r.checksum, r.size, content=sha256(gzip.decompress(files[r.name])))
                    for r in dl.SOURCES["mnist"].files)
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", remotes))
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(gzip.compress(gzip.decompress(data), compresslevel=1, mtime=12345))
    dl.download("mnist", tmp_path / "root", quiet=True)
    assert server.requests == []


def test_fallback_url_is_tried_when_the_first_fails(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files(), bases=(server.url + "/missing/", server.url + "/"))
    dl.download("mnist", tmp_path / "root", quiet=False)
    assert len(server.requests) == 8
    assert "HTTP error 404" in capsys.readouterr().err
    assert load_dataset("mnist", tmp_path / "root").num_classes == 10


def test_mirror_from_the_environment_replaces_the_table_urls(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files(), bases=(UNREACHABLE,))
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "/")
    code, _, err = run_cli(capsys, "mnist", "--root", str(tmp_path / "root"), "--quiet")
    assert code == 0 and err == ""
    assert sorted(server.requests) == sorted(f"/{n}" for n in IDX_NAMES)


def test_mirror_keyword_wins_over_the_environment(server, monkeypatch, tmp_path):
    serve_mnist(server, monkeypatch, idx_files(), bases=(UNREACHABLE,))
    monkeypatch.setenv(dl.MIRROR_ENV, "file:///etc")
    dl.download("mnist", tmp_path / "root", quiet=True, mirror=server.url)
    assert len(server.requests) == 4


def test_cifar10_archive_is_extracted_verified_and_loadable(server, monkeypatch, tmp_path, capsys):
    archive, batches = good_cifar()
    pin_cifar(server, monkeypatch, archive, batches)
    root = tmp_path / "root"
    code, out, err = run_cli(capsys, "cifar10", "--root", str(root), "--quiet")
    assert code == 0, err
    folder = root / "cifar10"
    assert out.strip() == f"cifar10: {folder}"
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-py"]  # archive deleted, no staging left
    for rel, data in batches.items():
        assert (folder / rel).read_bytes() == data
    ds = load_dataset("cifar10", root)
    assert (len(ds.train), len(ds.test)) == (10, 3) and ds.input_shape == (3, 32, 32)
    first = pickle.loads(batches["cifar-10-batches-py/data_batch_1"], encoding="bytes")
    assert torch.equal(ds.train.y[:2], torch.tensor(first[b"labels"]))
    # a second run finds the verified batches and fetches nothing
    dl.download("cifar10", root, quiet=True)
    assert len(server.requests) == 1


def test_svhn_download_places_the_mat_files_where_the_reader_looks(server, monkeypatch, tmp_path):
    import scipy.io

    remotes = []
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"X": RNG.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8),
                               "y": RNG.integers(1, 11, size=(n, 1)).astype(np.uint8)})
        data = buf.getvalue()
        remotes.append(dl.Remote(name, (server.add(name, data),), sha256(data), len(data)))
    monkeypatch.setitem(dl.SOURCES, "svhn", dl.Source("svhn", tuple(remotes)))
    assert dl.download("svhn", tmp_path, quiet=True) == tmp_path / "svhn"
    ds = load_dataset("svhn", tmp_path)
    assert (len(ds.train), len(ds.test)) == (5, 3) and ds.input_shape == (3, 32, 32)


def test_cifar10_with_a_damaged_batch_is_extracted_again(server, monkeypatch, tmp_path):
    archive, batches = good_cifar()
    pin_cifar(server, monkeypatch, archive, batches)
    root = tmp_path / "root"
    dl.download("cifar10", root, quiet=True)
    damaged = root / "cifar10" / "cifar-10-batches-py" / "test_batch"
    damaged.write_bytes(b"damaged")
    dl.download("cifar10", root, quiet=True)
    assert damaged.read_bytes() == batches["cifar-10-batches-py/test_batch"]
    assert len(server.requests) == 2 and sorted(p.name for p in (root / "cifar10").iterdir()) == [
        "cifar-10-batches-py"]


# ------------------------------------------------------------------------------------------------ failures


def test_checksum_mismatch_keeps_no_file_and_keeps_verified_ones(server, monkeypatch, tmp_path, capsys):
    files = idx_files()
    bad = IDX_NAMES[-1]
    serve_mnist(server, monkeypatch, files, pins={bad: sha256(b"what the publisher released")})
    root = tmp_path / "root"
    code, _, err = run_cli(capsys, "mnist", "--root", str(root), "--quiet")
    assert_one_line_error(code, err, f"{server.url}/{bad}", "checksum mismatch", "sha256")
    folder = root / "mnist"
    assert not (folder / bad).exists() and leftovers(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(IDX_NAMES[:-1])  # verified ones stay


def test_truncated_transfer_fails_cleanly(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files())
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "/trunc")
    root = tmp_path / "root"
    code, _, err = run_cli(capsys, "mnist", "--root", str(root), "--quiet")
    assert_one_line_error(code, err, f"{server.url}/trunc/{IDX_NAMES[0]}", "transfer")
    assert list((root / "mnist").iterdir()) == []


def test_truncated_transfer_without_pinned_size_is_still_caught(server, monkeypatch, tmp_path):
    """No pinned size: the server's Content-Length alone reveals the short body."""
    data = idx_files()[IDX_NAMES[1]]
    server.add(IDX_NAMES[1], data)
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", (
        dl.Remote(IDX_NAMES[1], (f"{server.url}/trunc/{IDX_NAMES[1]}",), sha256(data)),)))
    with pytest.raises(UserError, match="transfer"):
        dl.download("mnist", tmp_path, quiet=True)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_http_404_fails_cleanly(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files(), bases=(server.url + "/missing/",))
    root = tmp_path / "root"
    code, _, err = run_cli(capsys, "mnist", "--root", str(root), "--quiet")
    assert_one_line_error(code, err, f"{server.url}/missing/{IDX_NAMES[0]}", "HTTP error 404")
    assert list((root / "mnist").iterdir()) == []


def test_network_error_names_the_url(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files(), bases=(UNREACHABLE,))
    code, _, err = run_cli(capsys, "mnist", "--root", str(tmp_path), "--quiet")
    assert_one_line_error(code, err, UNREACHABLE + IDX_NAMES[0], "network error")


def test_wrong_announced_length_is_refused_before_downloading(server, monkeypatch, tmp_path):
    files = idx_files()
    serve_mnist(server, monkeypatch, files)
    remote = dl.SOURCES["mnist"].files[0]
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", (
        dl.Remote(remote.name, remote.urls, remote.checksum, remote.size + 1),)))
    with pytest.raises(UserError, match="server announces"):
        dl.download("mnist", tmp_path, quiet=True)
    assert list((tmp_path / "mnist").iterdir()) == []


@pytest.mark.parametrize("mirror", ["file:///etc", "ftp://example.org/data", "data:,hello", "127.0.0.1:8000", ""])
def test_non_http_mirror_is_refused(server, monkeypatch, tmp_path, capsys, mirror):
    serve_mnist(server, monkeypatch, idx_files())
    with pytest.raises(UserError, match="only http:// and https://"):
        dl.download("mnist", tmp_path / "root", quiet=True, mirror=mirror)
    if mirror:
        monkeypatch.setenv(dl.MIRROR_ENV, mirror)
        code, _, err = run_cli(capsys, "mnist", "--root", str(tmp_path / "root"), "--quiet")
        assert_one_line_error(code, err, "refused", "only http:// and https://")
    assert server.requests == [] and not (tmp_path / "root").exists()


def test_non_http_url_in_the_table_is_refused(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    monkeypatch.setitem(dl.SOURCES, "mnist", dl.Source("mnist", (
        dl.Remote("secret", (secret.as_uri(),), sha256(b"x")),)))
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    with pytest.raises(UserError, match="only http:// and https://"):
        dl.download("mnist", tmp_path / "root", quiet=True)
    assert not (tmp_path / "root" / "mnist" / "secret").exists()


def test_unknown_name_suggests_the_closest(capsys):
    code, _, err = run_cli(capsys, "mnst")
    assert_one_line_error(code, err, "'mnst'", "did you mean 'mnist'", "cifar10, fashion-mnist, mnist, svhn")
    code, _, err = run_cli(capsys, "digits")
    assert_one_line_error(code, err, "'digits'", "choose from")


def test_unwritable_root_is_one_line_naming_the_folder(server, monkeypatch, tmp_path, capsys):
    serve_mnist(server, monkeypatch, idx_files())
    root = tmp_path / "a-file"
    root.write_text("not a folder")
    code, _, err = run_cli(capsys, "mnist", "--root", str(root), "--quiet")
    assert_one_line_error(code, err, str(root / "mnist"))
    assert server.requests == []


# ------------------------------------------------------------------------------------------------ hostile archives


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


HOSTILE = {
    "dotdot": (lambda outside: [("cifar-10-batches-py/../../evil", b"pwned")], "'..'"),
    "absolute": (lambda outside: [(str(outside / "abs-evil"), b"pwned")], "absolute path"),
    "symlink": (lambda outside: [_link("cifar-10-batches-py", str(outside), tarfile.SYMTYPE),
                                 ("cifar-10-batches-py/evil", b"pwned")], "symbolic link"),
    "hardlink": (lambda outside: [_link("cifar-10-batches-py/data_batch_1", "/etc/passwd", tarfile.LNKTYPE)],
                 "hard link"),
    "fifo": (lambda outside: [_special("cifar-10-batches-py/pipe", tarfile.FIFOTYPE)], "FIFO"),
    "device": (lambda outside: [_special("cifar-10-batches-py/null", tarfile.CHRTYPE)], "device"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_with_nothing_written(server, monkeypatch, tmp_path, capsys, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    make, fragment = HOSTILE[kind]
    _, batches = good_cifar()
    # the hostile member comes *after* good ones: a checker that extracted as it went would already have written
    archive = tar_gz([*batches.items(), *make(outside)])
    pin_cifar(server, monkeypatch, archive, batches)
    root = tmp_path / "root"
    code, _, err = run_cli(capsys, "cifar10", "--root", str(root), "--quiet")
    assert_one_line_error(code, err, "refusing to extract", fragment)
    assert list((root / "cifar10").iterdir()) == []  # nothing extracted, no staging folder, refused archive deleted
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil").exists() and not (root / "evil").exists()


def test_archive_missing_a_pinned_batch_is_refused(server, monkeypatch, tmp_path):
    archive, batches = good_cifar()
    extra = dict(batches)
    extra["cifar-10-batches-py/data_batch_6"] = b"never shipped"
    pin_cifar(server, monkeypatch, archive, extra)
    with pytest.raises(UserError, match="does not contain cifar-10-batches-py/data_batch_6"):
        dl.download("cifar10", tmp_path, quiet=True)
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_checked_member_rules():
    from robustprune.data import archive as safe_tar

    folder = Path("/data/cifar10")
    archive = Path("a.tar.gz")
    ok = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    assert safe_tar._checked_member(ok, folder, archive) is ok
    for name in ["/etc/passwd", "../x", "a/../../x", "C:\\x", "\\\\server\\x", "a\\..\\..\\x"]:
        with pytest.raises(UserError, match="refusing to extract"):
            safe_tar._checked_member(tarfile.TarInfo(name), folder, archive)

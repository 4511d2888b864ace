"""Dataset readers: each format written small by the test and read back exactly; bad files give a one-line UserError."""
from __future__ import annotations

import builtins
import codecs
import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from robustprune.data import DATASETS, Dataset, Split, load_dataset, resolve_root
from robustprune.infra.errors import UserError

RNG = np.random.default_rng(0)
IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def user_error(fn, *fragments: str) -> str:
    """Run ``fn``, require a one-line UserError containing every fragment; return the message."""
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def exact(x: torch.Tensor, raw: np.ndarray) -> bool:
    """``x`` is exactly the uint8 array ``raw`` divided by 255 (float32)."""
    return x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(raw.astype(np.float32)) / 255.0)


# ----------------------------------------------------------------------------------------------- root and registry
def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTPRUNE_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("ROBUSTPRUNE_DATA")
    assert resolve_root(None) == Path.home() / ".cache" / "robustprune"
    assert resolve_root("~/data") == Path.home() / "data"


def test_registry_holds_every_reader():
    assert set(DATASETS.names()) >= {"digits", "mnist", "fashion-mnist", "cifar10", "svhn", "npz"}
    for name in DATASETS:
        source = DATASETS.get(name)
        assert source.name == name and (source.folder or name == "digits")


def test_unknown_dataset_suggests_a_name():
    user_error(lambda: load_dataset("mnst"), "unknown dataset 'mnst'", "did you mean 'mnist'")


# ----------------------------------------------------------------------------------------------- digits
def test_digits_shape_range_and_split():
    ds = load_dataset("digits", root="/nonexistent")  # the root is ignored
    assert len(ds.train) + len(ds.test) == 1797 and len(ds.test) == 360
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    for split in (ds.train, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.min() >= 0 and split.x.max() <= 1
    assert ds.train.x.max() == 1.0  # 16 -> 1
    totals = torch.bincount(ds.train.y, minlength=10) + torch.bincount(ds.test.y, minlength=10)
    share = torch.bincount(ds.test.y, minlength=10) / totals
    assert torch.all((share - 0.2).abs() < 0.01), share


def test_digits_is_deterministic_and_cache_safe():
    a = load_dataset("digits")
    a.train.x.zero_()  # a caller editing its tensors must not change the next load
    b, c = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(b.train.x, c.train.x) and torch.equal(b.test.y, c.test.y)
    assert b.train.x.max() == 1.0


def test_channel_stats_match_numpy():
    x = torch.from_numpy(RNG.random((7, 3, 4, 5), dtype=np.float32))
    ds = Dataset("t", Split(x, torch.zeros(7, dtype=torch.int64)), Split(x, torch.zeros(7, dtype=torch.int64)), 1)
    mean, std = ds.channel_stats()
    arr = x.numpy().astype(np.float64)
    np.testing.assert_allclose(mean, arr.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, arr.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1), rtol=1e-12)
    digits = load_dataset("digits")
    mean, std = digits.channel_stats()
    np.testing.assert_allclose(mean, [digits.train.x.double().mean().item()], rtol=1e-12)
    np.testing.assert_allclose(std, [digits.train.x.double().numpy().std(ddof=1)], rtol=1e-12)


# ----------------------------------------------------------------------------------------------- IDX (mnist, fashion)
def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool = True, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX_STEMS[0]: RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_STEMS[1]: RNG.integers(0, 10, n_train, dtype=np.uint8),
        IDX_STEMS[2]: RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_STEMS[3]: RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays[IDX_STEMS[0]][0, 0, 0], arrays[IDX_STEMS[0]][0, 0, 1] = 0, 255
    for stem, array in arrays.items():
        data = idx_bytes(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / name, gz=gz)
    ds = load_dataset(name, root=tmp_path)
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train.x.shape == (5, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    assert exact(ds.train.x, arrays[IDX_STEMS[0]][:, None]) and exact(ds.test.x, arrays[IDX_STEMS[2]][:, None])
    assert ds.train.x.min() == 0 and ds.train.x.max() == 1
    assert ds.train.y.dtype == torch.int64
    assert ds.train.y.tolist() == arrays[IDX_STEMS[1]].tolist() and ds.test.y.tolist() == arrays[IDX_STEMS[3]].tolist()


def test_idx_prefers_gz_over_raw(tmp_path):
    gz_arrays = write_idx_set(tmp_path / "mnist", gz=True)
    write_idx_set(tmp_path / "mnist", gz=False, n_train=4)
    ds = load_dataset("mnist", root=tmp_path)
    assert exact(ds.train.x, gz_arrays[IDX_STEMS[0]][:, None])


def test_idx_missing_files_name_every_expected_path(tmp_path):
    message = user_error(lambda: load_dataset("fashion-mnist", root=tmp_path), "robustprune download fashion-mnist")
    for stem in IDX_STEMS:
        assert str(tmp_path / "fashion-mnist" / f"{stem}.gz") in message
    write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    message = user_error(lambda: load_dataset("mnist", root=tmp_path), "t10k-labels-idx1-ubyte")
    assert "train-images" not in message


def rewrite(path: Path, edit) -> None:
    """Replace the IDX payload inside a .gz file by ``edit(payload)``."""
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()))))


@pytest.mark.parametrize(
    "stem, edit, fragment",
    [
        (IDX_STEMS[0], lambda b: b[:-10], "holds 3910"),  # truncated image data
        (IDX_STEMS[0], lambda b: b[:7], "truncated IDX header"),
        (IDX_STEMS[0], lambda b: b + b"\0", "holds 3921"),  # trailing garbage
        (IDX_STEMS[0], lambda b: b"\x00\x00\x08\x01" + b[4:], "bad IDX magic number 0x00000801"),
        (IDX_STEMS[1], lambda b: b"\x00\x00\x0d\x01" + b[4:], "bad IDX magic number"),
        (IDX_STEMS[1], lambda b: idx_bytes(np.zeros(4, np.uint8)), "5 images but"),  # wrong label count
        (IDX_STEMS[3], lambda b: idx_bytes(np.full(3, 10, np.uint8)), "label 10"),
    ],
    ids=["truncated", "short-header", "trailing", "magic-images", "magic-labels", "label-count", "label-range"],
)
def test_idx_malformed_files(tmp_path, stem, edit, fragment):
    write_idx_set(tmp_path / "mnist")
    rewrite(tmp_path / "mnist" / f"{stem}.gz", edit)
    message = user_error(lambda: load_dataset("mnist", root=tmp_path), fragment)
    assert stem in message


@pytest.mark.parametrize("corrupt", [lambda b: b"not gzip at all" + b, lambda b: b[: len(b) // 2],
                                     lambda b: b[:20] + bytes(x ^ 0xFF for x in b[20:40]) + b[40:]],
                         ids=["not-gzip", "truncated-gzip", "flipped-bytes"])
def test_idx_corrupted_gzip(tmp_path, corrupt):
    write_idx_set(tmp_path / "mnist")
    path = tmp_path / "mnist" / f"{IDX_STEMS[0]}.gz"
    path.write_bytes(corrupt(path.read_bytes()))
    user_error(lambda: load_dataset("mnist", root=tmp_path), str(path))


# ----------------------------------------------------------------------------------------------- CIFAR-10
class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as in the publisher's cPickle files (no ``_codecs.encode``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def cifar_batch(n: int) -> dict:
    return {b"batch_label": b"testing batch", b"labels": RNG.integers(0, 10, n).tolist(),
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def write_cifar(root: Path, py2: bool = False) -> dict[str, dict]:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {name: cifar_batch(3 if name == "test_batch" else 2) for name in CIFAR_FILES}
    for name, batch in batches.items():
        buffer = io.BytesIO()
        (Py2Pickler(buffer, protocol=2) if py2 else pickle.Pickler(buffer, protocol=2)).dump(batch)
        (folder / name).write_bytes(buffer.getvalue())
    return batches


@pytest.mark.parametrize("py2", [False, True], ids=["py3-protocol2", "py2-strings"])
def test_cifar10_round_trip(tmp_path, py2):
    batches = write_cifar(tmp_path, py2=py2)
    ds = load_dataset("cifar10", root=tmp_path)
    train_data = np.concatenate([batches[f][b"data"] for f in CIFAR_FILES[:5]])
    assert ds.train.x.shape == (10, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32) and ds.num_classes == 10
    assert exact(ds.train.x, train_data.reshape(-1, 3, 32, 32))
    assert exact(ds.test.x, batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    # the first 1024 values of a row are the red plane, row-major
    assert exact(ds.train.x[0, 0, 1, :], train_data[0, 32:64])
    assert exact(ds.train.x[0, 2, 0, :], train_data[0, 2048:2080])
    assert ds.train.y.dtype == torch.int64
    assert ds.train.y.tolist() == sum((batches[f][b"labels"] for f in CIFAR_FILES[:5]), [])
    assert ds.test.y.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_missing_files(tmp_path):
    message = user_error(lambda: load_dataset("cifar10", root=tmp_path), "robustprune download cifar10")
    for name in CIFAR_FILES:
        assert str(tmp_path / "cifar10" / "cifar-10-batches-py" / name) in message


class Payload:
    """Pickles as ``call(*args)``: what a malicious dataset file would run when loaded by ``pickle.load``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def malicious_payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').write('pwned')"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "codecs-other-encoding": Payload(codecs.encode, "abc", "rot13"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec", "codecs-other-encoding"])
def test_cifar10_refuses_malicious_pickle(tmp_path, payload):
    marker = tmp_path / "PWNED"
    write_cifar(tmp_path)
    batch = cifar_batch(2)
    batch[b"data"] = {"x": batch[b"data"], "evil": malicious_payloads(marker)[payload]}
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    if payload != "codecs-other-encoding":  # sanity: the plain unpickler really runs the payload
        pickle.loads(path.read_bytes(), encoding="bytes")
        assert marker.exists()
        marker.unlink()
    user_error(lambda: load_dataset("cifar10", root=tmp_path), str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda good: good[: len(good) // 2], "not a valid CIFAR-10 batch pickle"),
        (lambda good: b"garbage" * 10, "not a valid CIFAR-10 batch pickle"),
        (lambda good: pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "b'labels'"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 99), np.uint8), b"labels": [0, 1]}, protocol=2), "(N, 3072)"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "2 integers"),
        (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2), "0..9"),
    ],
    ids=["truncated", "garbage", "not-dict", "no-labels", "bad-shape", "label-count", "label-range"],
)
def test_cifar10_malformed_batches(tmp_path, make, fragment):
    write_cifar(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(make(path.read_bytes()))
    user_error(lambda: load_dataset("cifar10", root=tmp_path), str(path), fragment)


# ----------------------------------------------------------------------------------------------- SVHN
def write_svhn(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    (root / "svhn").mkdir(parents=True)
    written = {}
    for name, n in (("train_32x32.mat", 4), ("test_32x32.mat", 3)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [5]][:n], dtype=np.uint8)
        scipy.io.savemat(root / "svhn" / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_svhn_round_trip(tmp_path):
    written = write_svhn(tmp_path)
    ds = load_dataset("svhn", root=tmp_path)
    assert ds.train.x.shape == (4, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32) and ds.num_classes == 10
    x, _ = written["train_32x32.mat"]
    assert exact(ds.train.x, x.transpose(3, 2, 0, 1))
    assert exact(ds.train.x[1:2, 2, 5, 7], x[5, 7, 2, 1:2])  # x[n, c, h, w] == X[h, w, c, n]
    assert ds.train.y.dtype == torch.int64 and ds.train.y.tolist() == [0, 1, 9, 5] and ds.test.y.tolist() == [0, 1, 9]


def test_svhn_missing_files(tmp_path):
    message = user_error(lambda: load_dataset("svhn", root=tmp_path), "robustprune download svhn")
    for name in ("train_32x32.mat", "test_32x32.mat"):
        assert str(tmp_path / "svhn" / name) in message


@pytest.mark.parametrize(
    "variables, fragment",
    [
        (None, "not a readable MATLAB file"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "expected variables X and y"),
        ({"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1), np.uint8)}, "X must be uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)}, "y must hold 2"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)}, "1..10"),
    ],
    ids=["garbage", "no-y", "float-X", "label-count", "label-range"],
)
def test_svhn_malformed(tmp_path, variables, fragment):
    write_svhn(tmp_path)
    path = tmp_path / "svhn" / "test_32x32.mat"
    if variables is None:
        path.write_bytes(path.read_bytes()[:300])
    else:
        scipy.io.savemat(path, variables)
    user_error(lambda: load_dataset("svhn", root=tmp_path), str(path), fragment)


# ----------------------------------------------------------------------------------------------- npz
def write_npz(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize(
    "shape, to_nchw",
    [
        ((5, 6, 7), lambda a: a[:, None]),
        ((5, 6, 7, 1), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 6, 7, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 1, 6, 7), lambda a: a),
        ((5, 3, 6, 7), lambda a: a),
        ((5, 2, 6, 7), lambda a: a),
    ],
    ids=["NHW", "NHW1", "NHW3", "N1HW", "N3HW", "N2HW"],
)
def test_npz_layouts_uint8(tmp_path, shape, to_nchw):
    x_train, x_test = RNG.integers(0, 256, shape, dtype=np.uint8), RNG.integers(0, 256, (2, *shape[1:]), dtype=np.uint8)
    write_npz(tmp_path / "npz" / "data.npz", x_train=x_train, y_train=np.array([0, 1, 2, 1, 0]),
              x_test=x_test, y_test=np.array([4, 0], dtype=np.int32))
    ds = load_dataset("npz", root=tmp_path)
    assert exact(ds.train.x, to_nchw(x_train)) and exact(ds.test.x, to_nchw(x_test))
    assert ds.train.x.is_contiguous()
    assert ds.num_classes == 5  # max over both splits + 1
    assert ds.train.y.dtype == torch.int64 and ds.test.y.tolist() == [4, 0]


def test_npz_float_inputs_and_explicit_path(tmp_path):
    x = RNG.random((4, 2, 5, 5))
    path = write_npz(tmp_path / "elsewhere" / "mine.npz", x_train=x, y_train=np.array([[0], [1], [1], [0]]),
                     x_test=x[:1].astype(np.float32), y_test=np.array([1]))
    ds = load_dataset("npz", root=tmp_path / "unused", path=path)
    assert ds.train.x.dtype == torch.float32 and torch.equal(ds.train.x, torch.from_numpy(x.astype(np.float32)))
    assert ds.train.y.tolist() == [0, 1, 1, 0] and ds.num_classes == 2 and ds.input_shape == (2, 5, 5)


GOOD_NPZ = dict(x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0, 1]),
                x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.array([1]))


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"y_test": None}, "missing arrays y_test"),
        ({"x_train": np.full((2, 4, 4), 1.5)}, "must lie in [0, 1]"),
        ({"x_train": np.full((2, 4, 4), -0.1, np.float32)}, "must lie in [0, 1]"),
        ({"x_train": np.full((2, 4, 4), np.nan)}, "must lie in [0, 1]"),
        ({"x_train": np.zeros((2, 4, 4), np.int64)}, "uint8"),
        ({"x_train": np.zeros((2, 16), np.uint8)}, "expected shape"),
        ({"y_train": np.array([0, 1, 1])}, "expected 2 integer labels"),
        ({"y_train": np.array([0.0, 1.0])}, "expected 2 integer labels"),
        ({"y_train": np.array([0, -1])}, "labels must be >= 0"),
        ({"x_test": np.zeros((1, 5, 5), np.uint8)}, "x_test images are (1, 5, 5)"),
        ({"x_test": np.zeros((0, 4, 4), np.uint8), "y_test": np.zeros(0, np.int64)}, "x_test is empty"),
        ({"y_train": np.array([object(), object()], dtype=object)}, "not a readable .npz file"),
    ],
    ids=["missing-key", "above-1", "below-0", "nan", "int64-x", "2d-x", "label-count", "float-labels",
         "negative-label", "shape-mismatch", "empty", "object-array"],
)
def test_npz_bad_content(tmp_path, changes, fragment):
    arrays = {k: v for k, v in {**GOOD_NPZ, **changes}.items() if v is not None}
    path = tmp_path / "npz" / "data.npz"
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)  # savez pickles object arrays; the reader must refuse them
    user_error(lambda: load_dataset("npz", root=tmp_path), str(path), fragment)


def test_npz_missing_and_corrupted_files(tmp_path):
    user_error(lambda: load_dataset("npz", root=tmp_path), str(tmp_path / "npz" / "data.npz"), "x_train, y_train")
    user_error(lambda: load_dataset("npz", path=tmp_path / "nope.npz"), str(tmp_path / "nope.npz"))
    path = write_npz(tmp_path / "npz" / "data.npz", **GOOD_NPZ)
    path.write_bytes(path.read_bytes()[:200])
    user_error(lambda: load_dataset("npz", root=tmp_path), str(path), "not a readable .npz file")
    path.write_bytes(b"plain text, not an archive")
    user_error(lambda: load_dataset("npz", root=tmp_path), str(path), "not a readable .npz file")
    np.save(tmp_path / "single.npy", np.zeros(3))
    user_error(lambda: load_dataset("npz", path=tmp_path / "single.npy"), "single .npy array")

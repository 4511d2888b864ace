"""Every file robustprune reads is checked (DESIGN.md §8, Checkpoint metadata and Resume): a corrupted, modified or
crafted checkpoint, resume journal or npz dataset is refused with one UserError line (exit 2) — never a different
model loaded silently, never a crash (exit 1), never a huge allocation.

Crafted files are rewritten with a *valid* checksum (``_forge``) unless a test is about the checksum itself: the
checksum guards against corruption, and the checks behind it must still refuse what a forger can write.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from robustprune import pipeline
from robustprune.cli import main
from robustprune.data import load_dataset
from robustprune.infra.errors import UserError
from robustprune.export import load, read_metadata, save, sparse
from robustprune.infra import digest
from robustprune.export.describe import describe
from robustprune.models import create_model
from robustprune.pruning import apply_masks, masks, prunable_layers
from robustprune.pruning.structured import channel_masks
from robustprune.infra.resume import JOURNAL, Journal

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)  # the digits' shape: the CLI's default config can evaluate these models
INPUTS = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(123))
DENSITIES = (0.5, 0.05, 0.3, 0.02)  # per prunable layer: the sparse layout stores both bitmasks and varint gaps
PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


class Reached(BaseException):
    """Raised where a command would train or evaluate: the checkpoint passed every check."""


def _stop(*args, **kwargs):
    raise Reached()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn-small", SHAPE, 10).eval()


def _masked(seed: int = 0) -> torch.nn.Module:
    model = _model(seed)
    generator = torch.Generator().manual_seed(seed)
    apply_masks(model, {f"{name}.weight": (torch.rand(layer.weight.shape, generator=generator) < density).float()
                        for (name, layer), density in zip(prunable_layers(model), DENSITIES)})
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS)


def _tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def _forge(path: Path, dest: Path | None = None, *, tensors: dict | None = None, metadata: dict | None = None,
           sign: bool = True) -> Path:
    """Rewrite ``path`` with some tensors and metadata entries replaced (a JSON-able value, a function of the old
    value, or None to delete the entry) and, with ``sign``, a checksum that matches the new content."""
    state, meta = _tensors_and_metadata(path)
    state.update(tensors or {})
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        elif key in ("format", "format_version", digest.KEY):
            meta[key] = value
        else:
            meta[key] = json.dumps(value(json.loads(meta[key])) if callable(value) else value)
    dest = dest or path
    save_file(state, str(dest), metadata=digest.sign(state, meta) if sign else meta)
    return dest


def _header(path: Path) -> tuple[int, bytes]:
    """(header length incl. the 8-byte size, whole file)."""
    data = path.read_bytes()
    return 8 + int.from_bytes(data[:8], "little"), data


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real checkpoints: dense with masks, sparse (bitmask and varint parts), slim (filter-l1 channel masks)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    masked = _masked()
    out = {"dense": save(masked, folder / "dense.safetensors", stage="finetuned", config={"seed": 3},
                         metrics={"benign_acc": 0.5}),
           "sparse": save(masked, folder / "sparse.safetensors", format="sparse", stage="finetuned")}
    encodings = {part["encoding"] for part in read_metadata(out["sparse"])["sparse"].values()}
    assert encodings == {"bitmask", "delta"}, encodings
    structured = _model()
    apply_masks(structured, channel_masks(structured, INPUTS, 2.0, "layer"))
    out["slim"] = save(structured, folder / "slim.safetensors", format="slim")
    assert read_metadata(out["slim"])["arch"]["widths"]["1.0"][0] < 16
    return out


@pytest.fixture(scope="module")
def reference(files) -> dict[str, torch.nn.Module]:
    return {kind: load(path) for kind, path in files.items()}


def _same_model(model: torch.nn.Module, original: torch.nn.Module) -> bool:
    """Identical logits on the fixed inputs and identical masks."""
    got, want = masks(model), masks(original)
    return torch.equal(_logits(model), _logits(original)) and got.keys() == want.keys() \
        and all(torch.equal(got[k], want[k]) for k in want)


def _copy(files: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    dest = tmp_path / f"{kind}.safetensors"
    dest.write_bytes(files[kind].read_bytes())
    return dest


# ------------------------------------------------------------------------------------- 1. sparse position gaps

def test_delta_gaps_that_wrap_around_are_refused():
    gaps = np.array([10, 2**64 - 8, 17], dtype=np.uint64)  # as int64, -8 steps back: positions 10, 3, 21
    with pytest.raises(ValueError, match="gap"):
        sparse.decode("delta", sparse._varint_encode(gaps), 1000, 3)
    with pytest.raises(ValueError):  # a 10-byte varint whose bits beyond 64 would be dropped
        sparse.decode("delta", np.array([0x80] * 9 + [0x02], np.uint8), 1000, 1)
    with pytest.raises(ValueError):
        sparse.decode("delta", np.array([0, 0], np.uint8), 1, 2)  # more kept weights than the tensor has


def test_a_sparse_file_with_wrapping_gaps_is_refused(files, tmp_path):
    path = _copy(files, "sparse", tmp_path)
    parts = read_metadata(path)["sparse"]
    name = next(n for n, p in parts.items() if p["encoding"] == "delta")
    numel, count = int(np.prod(parts[name]["shape"])), parts[name]["count"]
    tensors, _ = _tensors_and_metadata(path)
    kept = np.flatnonzero(sparse.decode("delta", tensors[f"{name}:delta"].numpy(), numel, count))
    free = min(set(range(numel)) - set(kept.tolist()))
    assert free < kept[1]
    crafted = np.concatenate([[kept[1], free], kept[2:]])  # as many distinct positions in range, one not kept
    gaps = np.diff(crafted, prepend=-1) - 1  # the second is negative: a huge uint64 varint
    _forge(path, tensors={f"{name}:delta": torch.from_numpy(sparse._varint_encode(gaps.astype(np.uint64)))})
    with pytest.raises(UserError, match="does not match its architecture.*gap"):
        load(path)


# ------------------------------------------------------------------------------------------- 2. tensor values

def _poisoned(state: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    weight, mask = state["1.5.weight"].clone(), state["1.5.weight_mask"].clone()
    pruned, kept = (mask.flatten() == 0).nonzero()[0, 0], (mask.flatten() == 1).nonzero()[0, 0]
    if how == "nan-weight":
        weight.view(-1)[kept] = float("nan")
    elif how == "inf-under-a-zero-mask":
        weight.view(-1)[pruned] = float("inf")
    elif how == "pruned-weight-not-zero":
        weight.view(-1)[pruned] = 0.25
    elif how == "mask-not-binary":
        mask.view(-1)[kept] = 0.5
    elif how == "inf-bias":
        return {"1.5.bias": torch.full_like(state["1.5.bias"], float("inf"))}
    elif how == "negative-std":
        return {"0.std": -state["0.std"]}
    return {"1.5.weight": weight, "1.5.weight_mask": mask}


VALUES = {"nan-weight": "NaN or infinite", "inf-under-a-zero-mask": "NaN or infinite",
          "pruned-weight-not-zero": "pruned weights must be stored as 0", "mask-not-binary": "only 0 and 1",
          "inf-bias": "NaN or infinite", "negative-std": "std positive"}


@pytest.mark.parametrize("version", ["2", "1"])  # version 1 files (no checksum) get every other check
@pytest.mark.parametrize("how", sorted(VALUES))
def test_non_finite_weights_and_broken_masks_are_refused(files, tmp_path, how, version):
    path = _copy(files, "dense", tmp_path)
    tensors, _ = _tensors_and_metadata(path)
    changes = {"format_version": version, digest.KEY: None} if version == "1" else {}
    _forge(path, tensors=_poisoned(tensors, how), metadata=changes, sign=version == "2")
    with pytest.raises(UserError, match=VALUES[how]) as refused:
        load(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_non_finite_values_in_a_sparse_file_are_refused(files, tmp_path):
    path = _copy(files, "sparse", tmp_path)
    tensors, _ = _tensors_and_metadata(path)
    values = tensors["1.5.weight:values"].clone()
    values[0] = float("inf")
    _forge(path, tensors={"1.5.weight:values": values})
    with pytest.raises(UserError, match="NaN or infinite"):
        load(path)


def test_a_version_1_file_without_checksum_still_loads(files, reference, tmp_path):
    path = _forge(_copy(files, "sparse", tmp_path), metadata={"format_version": "1", digest.KEY: None}, sign=False)
    assert _same_model(load(path), reference["sparse"])


# --------------------------------------------------------------------------------------- 3. crafted structure

def _arch(change):
    return {"arch": lambda arch: change(copy.deepcopy(arch))}


def _part(change, encoding: str = "delta"):
    """Change the first sparse part stored with ``encoding``."""
    def apply(parts):
        name = next(n for n, p in parts.items() if p["encoding"] == encoding)
        parts[name] = change(parts[name])
        return parts
    return {"sparse": apply}


STRUCTURE = {  # name: (file, metadata changes)
    "arch-as-list": ("dense", {"arch": lambda arch: [arch]}),
    "arch-missing": ("dense", {"arch": None}),
    "arch-name-as-list": ("dense", _arch(lambda a: {**a, "name": [a["name"]]})),
    "input-shape-as-strings": ("dense", _arch(lambda a: {**a, "input_shape": ["1", "8", "8"]})),
    "input-shape-of-floats": ("dense", _arch(lambda a: {**a, "input_shape": [1, 8.0, 8]})),
    "input-shape-huge": ("dense", _arch(lambda a: {**a, "input_shape": [1, 10**6, 10**6]})),
    "input-shape-2d": ("dense", _arch(lambda a: {**a, "input_shape": [8, 8]})),
    "classes-huge": ("dense", _arch(lambda a: {**a, "num_classes": 10**9})),
    "classes-as-bool": ("dense", _arch(lambda a: {**a, "num_classes": True})),
    "classes-zero": ("dense", _arch(lambda a: {**a, "num_classes": 0})),
    "mean-as-dict": ("dense", _arch(lambda a: {**a, "mean": {"0": 0.5}})),
    "mean-wrong-length": ("dense", _arch(lambda a: {**a, "mean": [0.0, 0.0]})),
    "std-zero": ("dense", _arch(lambda a: {**a, "std": [0.0]})),
    "too-many-parameters": ("dense", _arch(lambda a: {**a, "name": "mlp", "input_shape": [1, 60_000, 60_000]})),
    "slim-not-bool": ("slim", _arch(lambda a: {**a, "slim": "yes"})),
    "widths-as-list": ("slim", _arch(lambda a: {**a, "widths": list(a["widths"].values())})),
    "widths-shape-as-dict": ("slim", _arch(lambda a: {**a, "widths": {**a["widths"], "1.0": {"out": 8}}})),
    "widths-negative": ("slim", _arch(lambda a: {**a, "widths": {**a["widths"], "1.0": [-8, 1, 4, 4]}})),
    "widths-wider-than-dense": ("slim", _arch(lambda a: {**a, "widths": {**a["widths"], "1.0": [32, 1, 4, 4]}})),
    "widths-other-kernel": ("slim", _arch(lambda a: {**a, "widths": {**a["widths"], "1.0": [4, 1, 3, 3]}})),
    "widths-without-slim": ("slim", _arch(lambda a: {**a, "slim": False})),
    "widths-do-not-fit": ("slim", _arch(lambda a: {**a, "widths": {**a["widths"], "1.2": [a["widths"]["1.2"][0],
                                                                                          1, 4, 4]}})),
    "layout-as-list": ("sparse", {"layout": ["sparse"]}),
    "dtype-as-list": ("sparse", {"dtype": ["fp32"]}),
    "sparse-as-list": ("sparse", {"sparse": lambda parts: list(parts.values())}),
    "sparse-part-as-list": ("sparse", _part(lambda p: [p["shape"], p["count"]])),
    "sparse-shape-as-string": ("sparse", _part(lambda p: {**p, "shape": "x".join(map(str, p["shape"]))})),
    "sparse-shape-negative": ("sparse", _part(lambda p: {**p, "shape": [-n for n in p["shape"]]})),
    "sparse-shape-terabytes": ("sparse", _part(lambda p: {**p, "shape": [10**6, 10**6]})),
    "sparse-shape-transposed": ("sparse", _part(lambda p: {**p, "shape": p["shape"][::-1]}, "bitmask")),
    "sparse-count-as-string": ("sparse", _part(lambda p: {**p, "count": str(p["count"])})),
    "sparse-count-as-float": ("sparse", _part(lambda p: {**p, "count": float(p["count"])})),
    "sparse-count-too-large": ("sparse", _part(lambda p: {**p, "count": 10**30})),
    "sparse-encoding-as-list": ("sparse", _part(lambda p: {**p, "encoding": [p["encoding"]]})),
    "sparse-part-on-a-buffer": ("sparse", {"sparse": lambda parts: {**parts, "0.mean": parts.popitem()[1]}}),
    "stage-as-list": ("dense", {"stage": ["finetuned"]}),
    "metrics-as-list": ("dense", {"metrics": [0.5]}),
}


EXPECTED = {"too-many-parameters": "parameters", "widths-do-not-fit": "do not fit together",
            "sparse-shape-terabytes": "not a parameter of the architecture", "widths-wider-than-dense": "the shape",
            "sparse-shape-negative": "non-negative", "arch-as-list": "must be a mapping"}


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_crafted_structure_is_refused_before_any_allocation(files, tmp_path, name):
    kind, changes = STRUCTURE[name]
    path = _forge(_copy(files, kind, tmp_path), metadata=changes)
    for read in (load, describe):  # `inspect` reads with the same checks
        with pytest.raises(UserError) as refused:
            read(path)
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 600, str(refused.value)
        assert EXPECTED.get(name, "") in str(refused.value), str(refused.value)


# -------------------------------------------------------------------------------------------- the checksum

def test_the_checksum_detects_a_changed_normalisation(files, tmp_path):
    path = _forge(_copy(files, "dense", tmp_path), metadata=_arch(lambda a: {**a, "mean": [0.25]}), sign=False)
    with pytest.raises(UserError, match="corrupted or was modified"):
        load(path)


def test_a_version_2_file_without_checksum_is_refused(files, tmp_path):
    path = _forge(_copy(files, "dense", tmp_path), metadata={digest.KEY: None}, sign=False)
    with pytest.raises(UserError, match="has no sha256 checksum"):
        load(path)


def test_a_flipped_weight_is_refused_and_the_checksum_covers_it(files, tmp_path):
    path = _copy(files, "dense", tmp_path)
    header, data = _header(path)
    path.write_bytes(data[:header + 100] + bytes([data[header + 100] ^ 0x10]) + data[header + 101:])
    with pytest.raises(UserError, match="corrupted or was modified"):
        load(path)
    assert read_metadata(path)["stage"] == "finetuned"  # the metadata alone still reads (no tensors: no check)


# --------------------------------------------------------------------------- every mutation: same model or refused

def _flip(data: bytes, where: int, xor: int) -> bytes:
    return data[:where] + bytes([data[where] ^ xor]) + data[where + 1:]


BYTE_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(["header", "data"]), st.floats(0, 1, exclude_max=True),
              st.integers(1, 255)),
    st.tuples(st.just("region"), st.sampled_from(["header", "data"]), st.floats(0, 1, exclude_max=True),
              st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.just("data"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("append"), st.just("data"), st.just(0.0), st.integers(1, 16)),
)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=5)


def _edit_bytes(path: Path, edit) -> None:
    action, region, where, amount = edit
    header, data = _header(path)
    start, end = (0, header) if region == "header" else (header, len(data))
    at = start + int(where * (end - start))
    if action == "flip":
        data = _flip(data, at, amount)
    elif action == "region":  # a run of bytes overwritten, as a bad sector would
        data = data[:at] + bytes((b ^ 0x5A) for b in data[at:at + amount]) + data[at + amount:]
    elif action == "truncate":
        data = data[:at]
    else:
        data = data + b"\x00" * amount
    path.write_bytes(data)


def _edit_json(value, path: list, new, action: str):
    """``value`` with the entry at ``path`` (indices into nested dicts / lists, taken modulo their size) replaced,
    deleted or wrapped in a list."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return [value] if action == "wrap" else new
    keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[path[0] % len(keys)]
    value = copy.copy(value)
    if len(path) == 1 and action == "delete":
        del value[key]
    else:
        value[key] = _edit_json(value[key], path[1:], new, action)
    return value


METADATA_EDITS = st.tuples(st.integers(0, 20), st.lists(st.integers(0, 50), max_size=4), JSON,
                           st.sampled_from(["set", "delete", "wrap"]), st.booleans())


def _edit_metadata(path: Path, edit) -> None:
    """One metadata field (or a value nested in it) changed; re-signed or not."""
    which, inner, new, action, sign = edit
    tensors, meta = _tensors_and_metadata(path)
    key = sorted(meta)[which % len(meta)]
    try:
        value = json.loads(meta[key])
    except ValueError:  # format, format_version, sha256: plain strings
        value = meta[key]
    if action == "delete" and not inner:
        del meta[key]
    else:
        changed = _edit_json(value, inner, new, action)
        meta[key] = changed if isinstance(value, str) and isinstance(changed, str) else json.dumps(changed)
    save_file(tensors, str(path), metadata=digest.sign(tensors, meta) if sign else meta)


def _outcome(call) -> str:
    try:
        call()
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return "refused"
    return "read"


def test_mutated_checkpoints_load_the_same_model_or_are_refused(files, reference, tmp_path):
    """Random byte edits anywhere (header and data) and random metadata edits, re-signed or not: ``load`` gives
    the original model (logits and masks) or a UserError, and ``inspect`` agrees; nothing else."""
    seen: dict[str, int] = {}

    @settings(PROPERTY, max_examples=150)
    @given(kind=st.sampled_from(sorted(files)), edit=st.one_of(BYTE_EDITS, METADATA_EDITS))
    def check(kind, edit):
        path = _copy(files, kind, tmp_path)
        (_edit_bytes if isinstance(edit[0], str) else _edit_metadata)(path, edit)
        loaded = []
        verdict = _outcome(lambda: loaded.append(load(path)))
        if loaded:
            assert _same_model(loaded[0], reference[kind]), (kind, edit)
        assert _outcome(lambda: describe(path)) == verdict, (kind, edit)
        seen[verdict] = seen.get(verdict, 0) + 1

    check()
    print(seen)
    assert seen.get("refused", 0) > 100 and seen.get("read", 0) > 0, seen  # both sides were reached


# ------------------------------------------------------------------------------------------- 5. the journal

def _training_state(seed: int):
    model = _masked(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A real journal after one epoch of fit call 0 of pre-training, with the state it holds."""
    folder = tmp_path_factory.mktemp("run")
    model, optimizer, scheduler, generator = _training_state(0)
    model.train()
    loss = model(INPUTS).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    writer = Journal(folder)
    writer.begin("pretrain")
    writer.save_epoch(writer.next_fit(), 1, model, optimizer, scheduler, generator, [{"loss": loss.item()}])
    return folder / JOURNAL, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _restore(folder: Path):
    model, optimizer, scheduler, generator = _training_state(1)
    reader = Journal(folder, resume=True)
    reader.begin("pretrain")
    epoch, _ = reader.restore(reader.next_fit(), model, optimizer, scheduler, generator)
    return epoch, model.state_dict(), optimizer.state_dict()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_journal_restores_exactly(journal):
    path, model_state, optim_state = journal
    epoch, model, optim = _restore(path.parent)
    assert epoch == 1 and _same(model, model_state) and _same(optim, optim_state)


def test_a_flipped_region_of_the_journal_is_refused(journal, tmp_path):
    path, _, _ = journal
    header, data = _header(path)
    middle = (header + len(data)) // 2
    (tmp_path / JOURNAL).write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                                     + data[middle + 64:])
    with pytest.raises(UserError, match="corrupted or was modified.*delete it"):
        _restore(tmp_path)


def test_a_journal_without_checksum_is_refused(journal, tmp_path):
    path, _, _ = journal
    tensors, meta = _tensors_and_metadata(path)
    save_file(tensors, str(tmp_path / JOURNAL), metadata={"journal": meta["journal"]})
    with pytest.raises(UserError, match="no sha256 checksum.*delete it"):
        _restore(tmp_path)


def test_mutated_journals_restore_the_same_state_or_are_refused(journal, tmp_path):
    path, model_state, optim_state = journal
    seen: dict[str, int] = {}

    @settings(PROPERTY, max_examples=100)
    @given(edit=st.one_of(BYTE_EDITS, METADATA_EDITS.map(lambda e: (*e[:4], False))))
    def check(edit):
        (tmp_path / JOURNAL).write_bytes(path.read_bytes())
        (_edit_bytes if isinstance(edit[0], str) else _edit_metadata)(tmp_path / JOURNAL, edit)
        restored = []
        verdict = _outcome(lambda: restored.append(_restore(tmp_path)))
        if restored:
            epoch, model, optim = restored[0]
            assert epoch == 1 and _same(model, model_state) and _same(optim, optim_state), edit
        seen[verdict] = seen.get(verdict, 0) + 1

    check()
    print(seen)
    assert seen.get("refused", 0) > 80, seen


# ------------------------------------------------------------------------------------------------- 4. npz data

def _npz(tmp_path: Path, **changes) -> Path:
    arrays = {"x_train": np.zeros((4, 6, 6), np.uint8), "y_train": np.array([0, 1, 2, 1]),
              "x_test": np.zeros((2, 6, 6), np.uint8), "y_test": np.array([0, 2])}
    arrays.update(changes)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"y_train": np.array([0, 1, 10**9, 1])}, "below 100,000"),
    ({"y_test": np.array([0, -3], np.int8)}, "labels must be >= 0"),
    ({"y_train": np.array([0, 1, 2**64 - 1, 1], np.uint64)}, "18446744073709551615"),
    ({"y_train": np.array([0, 1, 2, 2**63], np.uint64)}, "9223372036854775808"),
    ({"x_train": np.zeros((4, 0, 0), np.uint8), "x_test": np.zeros((2, 0, 0), np.uint8)}, "hold no pixels"),
    ({"x_train": np.zeros((4, 1, 0, 6), np.float32)}, "hold no pixels"),
], ids=["huge-label", "negative-label", "uint64-max-label", "uint64-label-2^63", "0x0-images", "zero-width"])
def test_npz_labels_and_images_are_checked(tmp_path, changes, fragment):
    path = _npz(tmp_path, **changes)
    with pytest.raises(UserError, match=fragment) as refused:
        load_dataset("npz", path=path)
    assert str(path) in str(refused.value)


def test_npz_with_uint64_labels_in_range_loads(tmp_path):
    data = load_dataset("npz", path=_npz(tmp_path, y_train=np.array([0, 1, 2, 1], np.uint64)))
    assert data.num_classes == 3 and data.train.y.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------- 6. the CLI

CRAFTED = {
    "flipped-byte": lambda path: path.write_bytes(_flip(path.read_bytes(), len(path.read_bytes()) - 50, 0x01)),
    "negative-shape": lambda path: _forge(path, metadata=_part(lambda p: {**p, "shape": [-n for n in p["shape"]]})),
    "nan-weight": lambda path: _forge(path, tensors=_poisoned(_tensors_and_metadata(path)[0], "nan-weight")),
    "arch-as-list": lambda path: _forge(path, metadata={"arch": lambda arch: [arch]}),
}


@pytest.mark.parametrize("command", ["inspect", "evaluate", "finetune", "export"])
@pytest.mark.parametrize("craft", sorted(CRAFTED))
def test_commands_refuse_crafted_files_in_one_line(files, tmp_path, capsys, monkeypatch, command, craft):
    for stage in ("measure", "finetune"):  # a file that got through would train or evaluate: stop there
        monkeypatch.setattr(pipeline, stage, _stop)
    monkeypatch.delenv("ROBUSTPRUNE_DEBUG", raising=False)
    kind = "sparse" if craft == "negative-shape" else "dense"
    path = _copy(files, kind, tmp_path)
    CRAFTED[craft](path)
    out = tmp_path / "out.safetensors"
    argv = {"inspect": ["inspect", str(path)], "evaluate": ["evaluate", str(path)],
            "finetune": ["finetune", str(path), "--out", str(out)],
            "export": ["export", str(path), "--format", "sparse", "--out", str(out)]}[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robustprune: error: ") and str(path) in err, err
    assert not out.exists()

"""Hostile input: fuzzed configs and command lines, malicious pickles, foreign weights, full disks, unwritable outputs.

The contract (DESIGN.md §3-4): bad input exits 2 with one line on stderr and leaves nothing behind; an OS failure
exits non-zero with one line; no pickle from disk is ever executed; a failed write never leaves a half-written or
temporary file. Nothing here trains: where a fuzzed input is valid, the pipeline is stopped at its first training
step (``Reached``), after every check and — for ``run`` — after the run folder and its config.yaml are written.
"""
from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import pickle
import re
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import robustprune
from robustprune import pipeline
from robustprune.cli import build_parser, main
from robustprune.config import load_config
from robustprune.export import load, read_metadata
from robustprune.infra import digest

SRC = Path(robustprune.__file__).parent
DEFAULT = load_config(None).to_dict()

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


class Reached(BaseException):
    """Raised where training would start: the input passed every check. A BaseException, so ``main`` lets it out."""


def _stop(*args, **kwargs):
    raise Reached(args)


def _error_line(err: str) -> str:
    """The one stderr line of a refused input: 'robustprune: error: ...', no traceback, not an internal error."""
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one stderr line: {err!r}"
    assert err.startswith("robustprune: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.strip()


def _refused(capsys, argv: list[str]) -> str:
    """``main(argv)`` exits 2 with one clean stderr line; returns the line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {argv}: {err!r}"
    return _error_line(err)


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Every step that trains, evaluates, sweeps or downloads stops with ``Reached``; no real data root."""
    import robustprune.sweep
    import robustprune.verification
    from robustprune.data import download

    for name in ("pretrain", "prune_model", "finetune", "measure"):
        monkeypatch.setattr(pipeline, name, _stop)
    monkeypatch.setattr(robustprune.verification, "verdicts", _stop)  # `verify` bounds and attacks: stop there
    monkeypatch.setattr(robustprune.sweep, "_run_sweep", _stop)
    monkeypatch.setattr(download, "download", _stop)
    empty = tmp_path / "empty-data-root"
    empty.mkdir()
    monkeypatch.setenv("ROBUSTPRUNE_DATA", str(empty))
    monkeypatch.delenv("ROBUSTPRUNE_DEBUG", raising=False)


# --------------------------------------------------------------------------------------------- a. fuzzed configs

def _setting_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in tree.items():
        paths.append(prefix + (key,))
        if isinstance(value, dict):
            paths += _setting_paths(value, prefix + (key,))
    return paths


PATHS = _setting_paths(DEFAULT)  # every setting and section, e.g. ("prune", "score_training", "lr")
NAMES = ["digits", "mnist", "npz", "cifar10", "mlp", "cnn-small", "pgd", "trades", "mart", "fast", "smooth", "ibp",
         "crown-ibp", "benign", "magnitude", "random", "filter-l1", "hydra", "linf", "l2", "cpu", "auto", "cuda",
         "cuda:1", "adam", "sgd", "cosine", "step", "onecycle", "constant", "oneshot", "iterative", "layer", "global",
         "ce", "margin", "fgsm", "autoattack", "crown"]
WEIRD = ["8/255", "1/0", "0/0", "-8/255", "1e999", "-1e999", "1" * 400 + "/3", "1e999999999", "nan", "NaN", "inf",
         "-inf", ".nan", "-0", "0x10", "1_000", "", " ", "\t", "null", "~", "yes", "no", "on", "off", "é", "a\nb",
         "../../etc/passwd", "None", "True", "[1, 2]", "{a: 1}", "0.3", "1e-3", "2**10", "__import__('os')"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-3, max_value=12),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1),
    st.sampled_from(NAMES), st.sampled_from(WEIRD), st.text(max_size=10),
)
KEYS = st.one_of(st.sampled_from(sorted({p[-1] for p in PATHS})), st.text(max_size=8), st.integers(-2, 2))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=6)


def _mutate(doc: dict, action: str, path: tuple, key, value) -> None:
    *parents, last = path
    node = doc
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if not isinstance(node, dict):
        return
    if action == "set":
        node[last] = value
    elif action == "delete":
        node.pop(last, None)
    elif action == "rename" and last in node:
        node[key] = node.pop(last)
    elif action == "add" and isinstance(node.get(last), dict):
        node[last][key] = value
    elif action == "wrap" and last in node:
        node[last] = [node[last]]


MUTATION = st.tuples(st.sampled_from(["set", "set", "set", "delete", "rename", "add", "wrap"]), st.sampled_from(PATHS),
                     KEYS, st.one_of(st.sampled_from(WEIRD), st.sampled_from(NAMES), VALUES))
MUTATED_DEFAULTS = st.builds(lambda ms: _apply(ms), st.lists(MUTATION, min_size=1, max_size=3))


def _apply(mutations) -> dict:
    doc = copy.deepcopy(DEFAULT)
    for mutation in mutations:
        _mutate(doc, *mutation)
    return doc


RANDOM_DOCS = st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=4),
                        st.dictionaries(st.sampled_from(list(DEFAULT)), VALUES, max_size=4))


def _check_config_outcome(capsys, cfg_file: Path, out: Path, outcomes: list) -> None:
    """``run -c cfg_file``: refused cleanly (exit 2, one line, no folder) or valid (reaches training, wrote a
    config.yaml that reads back as the same config)."""
    capsys.readouterr()
    try:
        code = main(["run", "-c", str(cfg_file), "--out", str(out), "--quiet"])
    except Reached as reached:
        cfg = reached.args[0][1]
        assert cfg.to_dict() == load_config(cfg_file).to_dict()
        assert load_config(out / "config.yaml").to_dict() == cfg.to_dict()
        outcomes.append("valid")
        return
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err!r}\nconfig:\n{cfg_file.read_text(errors='replace')[:2000]}"
    _error_line(err)
    assert not out.exists(), "a refused config left a run folder behind"
    outcomes.append("refused")


def _dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=False)


def test_fuzzed_mutations_of_the_default_config(no_training, capsys, tmp_path):
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=120)
    @given(doc=MUTATED_DEFAULTS)
    def check(doc):
        case = Path(tempfile.mkdtemp(dir=tmp_path))
        (case / "cfg.yaml").write_text(_dump(doc))
        _check_config_outcome(capsys, case / "cfg.yaml", case / "run", outcomes)

    check()
    assert {"valid", "refused"} <= set(outcomes), outcomes  # the fuzz reached both sides of validation


def test_fuzzed_random_config_documents(no_training, capsys, tmp_path):
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=80)
    @given(doc=RANDOM_DOCS)
    def check(doc):
        case = Path(tempfile.mkdtemp(dir=tmp_path))
        (case / "cfg.yaml").write_text(_dump(doc))
        _check_config_outcome(capsys, case / "cfg.yaml", case / "run", outcomes)

    check()
    assert "refused" in outcomes


ALIAS_BOMB = "data:\n  name: [" + ", ".join(  # 9^7 strings once expanded; 600 bytes as YAML
    f"&{c} [" + ", ".join([f"*{p}"] * 9 if p else ["x"] * 9) + "]"
    for p, c in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg")) + "]\n"
V, R = "valid", "refused"
RAW_YAML = [  # (document, expected outcome)
    ("{", R), ("- a\n- b\n", R), ("a: [1, 2\n", R), ("\t:", R), ("--- \na: 1\n--- \nb: 2\n", R),
    ("!!python/object/apply:os.system ['true']\n", R),
    ("threat: !!python/object/apply:pathlib.Path.touch ['{marker}']\n", R), ("name: !!binary aGVsbG8=\n", R),
    ("seed: " + "9" * 5000 + "\n", R), ("seed: 18446744073709551616\n", R), ("seed: -1\n", V),
    ("threat: {eps: 1e999}\n", R), ("threat: {eps: 1.0e+999}\n", R), ("threat: {eps: '1e999999999'}\n", R),
    ("threat: {eps: '" + "1" * 400 + "/3'}\n", R), ("threat: {eps: .nan}\n", R), ("threat: {eps: 8/255}\n", V),
    ("threat: {eps: 10" + "0" * 400 + "}\n", R), ("name: " + "[" * 3000 + "]" * 3000 + "\n", R),
    ("data: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n", R), ("a: &a [x, x, x, x, x, x, x, x, x]\n", R),
    ("&a [*a]\n", R), ("&a {data: *a}\n", R), ("data: &a {name: digits, x: *a}\n", R), (ALIAS_BOMB, R),
    ("\ufeffname: bom\n", None), ("\"a\\nb\": 1\n", R), ("\"\\0\": 1\n", R),
    ("data: {name: npz, path: \"a\\0b\"}\n", R), ("prune: {compression: null, sparsity: null}\n", R),
    ("prune: {sparsity: 1}\n", R), ("prune: {sparsity: 0.5}\n", V), ("pretrain: {milestones: {a: 1}}\n", R),
    ("evaluate: {attacks: [pgd, pgd]}\n", R), ("evaluate: {attacks: pgd}\n", V),
    ("finetune_objective: {name: trades}\n", V), ("finetune_objective: 3\n", R),
    ("device: 'cuda:99999999999999999999'\n", R), ("device: cudax\n", R), ("objective: {name: pgd, steps: 2.0}\n", V),
    ("objective: {steps: 2.5}\n", R), ("tensorboard: 'yes'\n", R),
]


@pytest.mark.parametrize("text, expected", RAW_YAML, ids=range(len(RAW_YAML)))
def test_hand_written_hostile_yaml(no_training, capsys, tmp_path, text, expected):
    marker = tmp_path / "pwned"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    outcome: list[str] = []
    _check_config_outcome(capsys, cfg_file, tmp_path / "run", outcome)
    assert expected is None or outcome == [expected]
    assert not marker.exists()


def test_fuzzed_raw_bytes_as_config(no_training, capsys, tmp_path):
    @settings(FUZZ, max_examples=60)
    @given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def check(data):
        case = Path(tempfile.mkdtemp(dir=tmp_path))
        (case / "cfg.yaml").write_bytes(data)
        _check_config_outcome(capsys, case / "cfg.yaml", case / "run", [])

    check()


HOSTILE_VALUES = [*WEIRD, None, True, False, 0, -1, 1, 2**63, -(2**63) - 1, 2**70, 10**400, 1e308, -1e-308, 0.5,
                  float("nan"), float("inf"), -float("inf"), [], [1], ["pgd", "pgd"], [[1]], {}, {"a": 1}, {"name": 1}]


def test_every_setting_against_every_hostile_value():
    """``--set KEY=VALUE`` for each setting (sections included) and each hostile value: a valid Config whose seed
    torch accepts, whose names resolve and which rebuilds from its own dict — or one short UserError line."""
    from robustprune.infra.errors import UserError
    from robustprune.infra.runtime import seed_everything

    outcomes = {"valid": 0, "refused": 0}
    for i, path in enumerate(PATHS):
        for value in HOSTILE_VALUES[i % 2::2]:  # half the pairs: each value still meets ~45 settings of every type
            scalar = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
            try:
                cfg = load_config(None, [f"{'.'.join(path)}={scalar}"])
                pipeline.check_names(cfg)
                if path == ("seed",):
                    seed_everything(cfg.seed)
            except UserError as err:
                assert "\n" not in str(err) and len(str(err)) < 600, (path, value, str(err))
                outcomes["refused"] += 1
                continue
            assert load_config(None, base=cfg.to_dict()) == cfg, (path, value)
            outcomes["valid"] += 1
    assert min(outcomes.values()) > 50, outcomes


def test_config_messages_stay_short_for_alias_bombs(no_training, capsys, tmp_path):
    """A 600-byte YAML alias bomb must not become a 28 MB (or 9^9-element) error line."""
    cfg_file = tmp_path / "bomb.yaml"
    cfg_file.write_text(ALIAS_BOMB)
    line = _refused(capsys, ["run", "-c", str(cfg_file), "--out", str(tmp_path / "run")])
    assert len(line) < 2000 and "data.name must be a string" in line


# --------------------------------------------------------------------------------------------- b. fuzzed argv

def _subparsers() -> dict:
    """Each command's argparse parser, read from the parser itself (so new commands and options are fuzzed too)."""
    return next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices


SUBPARSERS = _subparsers()
COMMANDS = sorted(SUBPARSERS)
OPTIONS = sorted({s for p in [build_parser(), *SUBPARSERS.values()] for a in p._actions for s in a.option_strings})
DOTTED = [".".join(p) for p in PATHS]
FILES = ["model.safetensors", "weights.pt", "good.yaml", "bad.yaml", "evil.safetensors", "evil.pt", "folder",
         "missing.safetensors", "new.safetensors", "new.pt", "runs", "folder/new.safetensors", "model.safetensors/x"]
ARG_VALUES = ["models", "datasets", "objectives", "pruners", "attacks", "verifiers", "sparse", "slim", "onnx", "fp16",
              "bf16", "fp32", "layer", "global", "pgd,fgsm", "pgd,pgd", ",", "2,5", "1", "0", "-1", "nan", "inf",
              "1e999", "0.5", "1,x", "mnist", "digits", "cifar10", "-", "--", "=", "a=b"]
TOKEN_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\~"), max_size=8)
JUNK = st.sampled_from(ARG_VALUES) | st.sampled_from(FILES) | TOKEN_TEXT
SET_PAIR = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | TOKEN_TEXT,
                     st.sampled_from(NAMES + WEIRD).filter(lambda v: "\n" not in v) | TOKEN_TEXT)
LISTS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(",".join)
NUMBERS = st.sampled_from(["2", "10", "1", "0.5", "0", "-1", "nan", "inf", "1e999", "2,5", "1,x", ",", "1e6"])
VALUE_BY_DEST = {  # plausible values per option / positional, so the fuzz gets past argparse into the checks
    "overrides": SET_PAIR, "config": st.sampled_from(["good.yaml", "bad.yaml", "missing.yaml", "evil.pt", "folder"]),
    "out": st.sampled_from(["new.safetensors", "new", "folder", "model.safetensors", "folder/new.safetensors",
                            "missing/x.safetensors", "new.onnx"]),
    "checkpoint": st.sampled_from(["model.safetensors"] * 4 + ["evil.safetensors", "weights.pt", "missing", "folder"]),
    "weights": st.sampled_from(["weights.pt"] * 3 + ["evil.pt", "model.safetensors", "missing.pt", "good.yaml"]),
    "compression": NUMBERS, "sparsity": NUMBERS, "rule": st.sampled_from(NAMES), "attacks": LISTS, "rules": LISTS,
    "pretrain_objectives": LISTS, "finetune_objectives": LISTS, "root": st.sampled_from(["folder", "new-root"]),
    "name": st.sampled_from(["mnist", "fashion-mnist", "cifar10", "svhn", "mnst", "digits"]),
}
VALUE_BY_DEST["file"] = VALUE_BY_DEST["checkpoint"]
VALUE_BY_DEST["folder"] = st.sampled_from(["folder", "runs", "missing", "model.safetensors"])


def _value(action) -> st.SearchStrategy:
    plausible = st.sampled_from(sorted(action.choices)) if action.choices else VALUE_BY_DEST.get(action.dest, JUNK)
    return st.one_of(plausible, plausible, plausible, JUNK)  # junk a quarter of the time


def _structured(command: str) -> st.SearchStrategy:
    """``command POSITIONALS [--option value ...] [junk]``: argv that mostly gets past argparse."""
    actions = [a for a in SUBPARSERS[command]._actions if a.option_strings and a.dest != "help"]
    positional = st.tuples(*[_value(a) for a in SUBPARSERS[command]._actions if not a.option_strings])
    option = st.sampled_from(actions or [SUBPARSERS[command]._actions[0]]).flatmap(lambda a: st.tuples(
        st.sampled_from(a.option_strings), st.just(()) if a.nargs == 0 else _value(a).map(lambda v: (v,))))
    tail = st.sampled_from([[], [], [], ["-h"]]) | st.lists(JUNK, max_size=1)
    return st.tuples(positional, st.lists(option, max_size=5 if actions else 0), tail).map(
        lambda parts: [command, *parts[0], *[t for o, v in parts[1] for t in (o, *v)], *parts[2]])


TOKENS = st.one_of(
    st.sampled_from(OPTIONS).map(lambda t: [t]), st.sampled_from(ARG_VALUES).map(lambda t: [t]),
    st.sampled_from(FILES).map(lambda t: [t]), SET_PAIR.map(lambda t: ["--set", t]), TOKEN_TEXT.map(lambda t: [t]),
)
RANDOM_ARGV = st.one_of(
    st.lists(TOKENS, max_size=6).map(lambda ts: [t for tt in ts for t in tt]),
    st.tuples(st.sampled_from(COMMANDS + ["frobnicate", ""]), st.sampled_from(FILES + ARG_VALUES),
              st.lists(TOKENS, max_size=6)).map(lambda c: [c[0], c[1], *[t for tt in c[2] for t in tt]]),
)
ARGV = st.sampled_from(["random"] + COMMANDS * 2).flatmap(
    lambda kind: RANDOM_ARGV if kind == "random" else _structured(kind))
SAFE_COMMANDS = {"list", "inspect", "export", "import", "report"}  # may legitimately succeed without training
HELPISH = re.compile(r"^(-h|--h(e(lp?)?)?|--v(e(r(s(i(on?)?)?)?)?)?)$")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding real inputs (checkpoint, weights, configs, a malicious pickle) under short names."""
    work = tmp_path / "work"
    work.mkdir()
    model = _default_model()
    torch.save(model.state_dict(), work / "weights.pt")
    assert main(["import", str(work / "weights.pt"), "--out", str(work / "model.safetensors")]) == 0
    (work / "good.yaml").write_text("pretrain: {epochs: 1}\nevaluate: {n_samples: 10}\n")
    (work / "bad.yaml").write_text("threat: {eps: -1}\n")
    zipped, raw = _payloads(tmp_path / "pwned")
    (work / "evil.safetensors").write_bytes(zipped)
    (work / "evil.pt").write_bytes(raw)
    (work / "folder").mkdir()
    monkeypatch.chdir(work)
    return work


def test_fuzzed_command_lines(no_training, workdir, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "prepare_out_dir", _stop)  # random --out/--force must never delete a folder
    seen: dict[str, int] = {}

    @settings(FUZZ, max_examples=300)
    @given(argv=ARGV)
    def check(argv):
        capsys.readouterr()
        try:
            code = main(argv)
        except Reached:
            seen["reached"] = seen.get("reached", 0) + 1
            seen[argv[0]] = seen.get(argv[0], 0) + 1
            return
        except SystemExit as stop:  # argparse's own --help / --version
            out = capsys.readouterr().out
            assert stop.code == 0 and any(HELPISH.match(t) for t in argv), (argv, stop.code)
            assert "usage:" in out or f"robustprune {robustprune.__version__}" in out
            seen["help"] = seen.get("help", 0) + 1
            return
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "internal error" not in captured.err, (argv, captured.err)
        if code == 0:
            assert argv[0] in SAFE_COMMANDS and captured.err == "", (argv, captured.err)
        else:
            assert code == 2, (argv, code, captured.err)
            line = _error_line(captured.err)
        outcome = "ok" if code == 0 else "usage" if "--help`)" in line else "refused"
        seen[outcome] = seen.get(outcome, 0) + 1
        seen[argv[0] if argv else ""] = seen.get(argv[0] if argv else "", 0) + 1

    check()
    print(seen)
    assert {"reached", "help", "ok", "usage", "refused"} <= set(seen), seen  # every layer was reached
    assert not (workdir.parent / "pwned").exists()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["import", "-h"]])
def test_help_and_version_exit_0(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0 and capsys.readouterr().out.strip()


def test_newline_in_an_argument_stays_one_line(capsys, tmp_path):
    _refused(capsys, ["run", "-c", str(tmp_path / "a\nb.yaml")])


# --------------------------------------------------------------------------------------------- c. pickle safety

class _Touch:
    """A pickle that, when loaded unsafely, creates ``path`` (pure Python; no shell)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _payloads(marker: Path) -> tuple[bytes, bytes]:
    """(torch.save zip archive, raw pickle) of a state dict whose loading unsafely runs ``marker.touch()``."""
    buffer = io.BytesIO()
    torch.save({"1.1.weight": _Touch(marker)}, buffer)
    return buffer.getvalue(), pickle.dumps({"1.1.weight": _Touch(marker)}, protocol=4)


def test_payloads_are_really_malicious(tmp_path):
    """Control: loaded the unsafe way, both payloads run code (so the tests below are meaningful)."""
    zipped, raw = _payloads(tmp_path / "zip-marker")
    torch.load(io.BytesIO(zipped), weights_only=False)
    assert (tmp_path / "zip-marker").exists()
    _, raw = _payloads(tmp_path / "raw-marker")
    pickle.loads(raw)
    assert (tmp_path / "raw-marker").exists()


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_import_refuses_pickled_code(capsys, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_payloads(marker)[kind == "raw"])
    out = tmp_path / "out.safetensors"
    line = _refused(capsys, ["import", str(evil), "--out", str(out)])
    assert "not a weights-only PyTorch state dict" in line and str(evil) in line
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("kind", ["zip", "raw"])
@pytest.mark.parametrize("command", [["evaluate"], ["inspect"], ["export", "--format", "sparse"],
                                     ["prune", "--out", "OUT"], ["finetune", "--out", "OUT"]])
def test_checkpoint_commands_refuse_a_pickle_named_safetensors(capsys, tmp_path, kind, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(_payloads(marker)[kind == "raw"])
    argv = [command[0], str(evil), *[str(tmp_path / "out.safetensors") if a == "OUT" else a for a in command[1:]]]
    line = _refused(capsys, argv)
    assert "not a valid robustprune safetensors checkpoint" in line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.safetensors"]  # nothing written, no temporaries


FORGED = {  # metadata changes that make a checkpoint lie about itself
    "arch-not-json": {"arch": "{not json"},
    "arch-unknown-model": {"arch": lambda a: {**a, "name": "os.system"}},
    "arch-wrong-types": {"arch": lambda a: {**a, "input_shape": "abc"}},
    "arch-negative-classes": {"arch": lambda a: {**a, "num_classes": -5}},
    "config-not-a-mapping": {"config": [1]},
    "config-invalid": {"config": {"threat": {"eps": "1e999"}}},
    "sparse-parts-missing": {"layout": "sparse", "sparse": {"1.1.weight": {"shape": [256, 64], "encoding": "bitmask",
                                                                             "count": 5}}},
    "version-from-the-future": {"format_version": "99"},
}


def _forge(source: Path, dest: Path, changes: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(source), "pt") as handle:
        meta = handle.metadata()
    for key, value in changes.items():
        if key == "format_version":
            meta[key] = value
        elif callable(value):
            meta[key] = json.dumps(value(json.loads(meta[key])))
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = load_file(str(source))
    save_file(tensors, str(dest), metadata=digest.sign(tensors, meta))  # a valid checksum: the other checks refuse


@pytest.mark.parametrize("forgery", sorted(FORGED))
@pytest.mark.parametrize("command", ["evaluate", "export", "prune", "finetune"])
def test_forged_checkpoint_metadata_is_refused(no_training, workdir, capsys, forgery, command):
    _forge(workdir / "model.safetensors", workdir / "forged.safetensors", FORGED[forgery])
    argv = {"evaluate": ["evaluate", "forged.safetensors"],
            "export": ["export", "forged.safetensors", "--format", "sparse"],
            "prune": ["prune", "forged.safetensors", "--out", "p.safetensors"],
            "finetune": ["finetune", "forged.safetensors", "--out", "f.safetensors"]}[command]
    capsys.readouterr()
    code = main(argv)  # a forged checkpoint never gets as far as Reached (training / evaluation)
    err = capsys.readouterr().err
    if command == "export" and forgery.startswith("config-"):  # export does not read the stored config
        assert code == 0 and (workdir / "forged.sparse.safetensors").is_file()
        return
    assert code == 2, (forgery, command, err)
    _error_line(err)
    assert not any(p.name.startswith(("p.", "f.", "forged.sparse")) for p in workdir.iterdir())


TAMPERED = ["truncated", "offsets-beyond-the-file", "dtype-lies"]


def _tamper(source: Path, dest: Path, how: str) -> None:
    data = source.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    if how == "truncated":
        dest.write_bytes(data[: len(data) // 2])
        return
    header[name]["data_offsets"] = [0, 10**12] if how == "offsets-beyond-the-file" else header[name]["data_offsets"]
    header[name]["dtype"] = "F64" if how == "dtype-lies" else header[name]["dtype"]
    raw = json.dumps(header).encode()
    dest.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])


@pytest.mark.parametrize("how", TAMPERED)
@pytest.mark.parametrize("command", ["evaluate", "export", "prune"])
def test_tampered_tensor_data_is_refused(no_training, workdir, capsys, how, command):
    _tamper(workdir / "model.safetensors", workdir / "bad.safetensors", how)
    extra = {"evaluate": [], "export": ["--format", "sparse"], "prune": ["--out", "p.safetensors"]}[command]
    line = _refused(capsys, [command, "bad.safetensors", *extra])
    assert "bad.safetensors" in line


@pytest.mark.parametrize("how", TAMPERED)
def test_inspect_refuses_tampered_tensor_data(workdir, capsys, how):
    _tamper(workdir / "model.safetensors", workdir / "bad.safetensors", how)
    _refused(capsys, ["inspect", "bad.safetensors"])


@pytest.mark.parametrize("name, content", [("report.json", "{}"), ("sweep.json", '{"stages": 5}')])
def test_report_refuses_a_malformed_json(capsys, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    _refused(capsys, ["report", str(tmp_path)])


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(`` call in ``text`` (balanced parentheses)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[match.end():i - 1])
    return calls


def test_source_loads_pickles_only_weights_only_or_numpy_only():
    sources = {p: p.read_text() for p in SRC.rglob("*.py")}
    loads = [(p, args) for p, text in sources.items() for args in _calls(text, "torch.load")]
    assert loads, "robustprune.export.external must call torch.load"
    for path, args in loads:
        assert re.search(r"weights_only\s*=\s*True", args), f"{path}: torch.load({args})"
    for path, text in sources.items():
        if re.search(r"\bpickle\.loads?\b|\bUnpickler\b|\bdill\b|\bjoblib\.load\b|\bcloudpickle\b", text):
            assert path == SRC / "data" / "cifar10.py", f"{path} unpickles"
        for args in _calls(text, "np.load") + _calls(text, "numpy.load"):
            assert re.search(r"allow_pickle\s*=\s*False", args), f"{path}: np.load({args})"
        assert not re.search(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|yaml\.(unsafe_)?load\(", text), path


def test_the_grep_helper_sees_multiline_calls():
    text = "x = torch.load(\n    path,\n    weights_only=f(1),\n)\ny = torch.load(p, weights_only=True)"
    assert _calls(text, "torch.load") == ["\n    path,\n    weights_only=f(1),\n", "p, weights_only=True"]


# --------------------------------------------------------------------------------------------- d. import

def _default_model() -> torch.nn.Module:
    """The embedded default's model, built as ``robustprune import`` builds it, with non-initial weights."""
    cfg = load_config(None)
    model = pipeline.new_model(cfg, pipeline.load_data(cfg))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def default_model():
    return _default_model()


@pytest.fixture(scope="module")
def digits_inputs():
    cfg = load_config(None)
    return pipeline.load_data(cfg).test.x[:64]


def _import(tmp_path, state) -> tuple[int, Path]:
    weights, out = tmp_path / "w.pt", tmp_path / "out.safetensors"
    torch.save(state, weights)
    return main(["import", str(weights), "--out", str(out)]), out


@pytest.mark.parametrize("layout", ["plain", "module.", "state_dict", "model_state_dict", "model", "compiled-ddp"])
def test_import_gives_identical_logits(tmp_path, default_model, digits_inputs, layout):
    state = default_model.state_dict()
    wrapped = {"plain": state, "module.": {f"module.{k}": v for k, v in state.items()},
               "state_dict": {"state_dict": state, "epoch": 7}, "model": {"model": state, "step": 3},
               "model_state_dict": {"model_state_dict": state, "optimizer_state_dict": {"lr": 0.1}},
               "compiled-ddp": {f"module._orig_mod.{k}": v for k, v in state.items()}}[layout]
    code, out = _import(tmp_path, wrapped)
    assert code == 0
    imported = load(out)
    assert read_metadata(out)["stage"] == "pretrained"
    with torch.no_grad():
        assert torch.equal(imported(digits_inputs), default_model(digits_inputs))


def test_import_keeps_masks_of_torch_prune_and_of_robustprune(tmp_path, default_model, digits_inputs):
    import torch.nn.utils.prune as torch_prune

    from robustprune.pruning import plain_state_dict, prune, sparsity_report

    model = copy.deepcopy(default_model)
    torch_prune.l1_unstructured(model[1][1], "weight", amount=0.7)
    state = model.state_dict()
    assert "1.1.weight_orig" in state and "1.1.weight_mask" in state
    code, out = _import(tmp_path, state)
    assert code == 0
    imported = load(out)
    with torch.no_grad():
        assert torch.equal(imported(digits_inputs), model(digits_inputs))
    assert int((imported[1][1].weight == 0).sum()) == int((state["1.1.weight_mask"] == 0).sum())

    ours = copy.deepcopy(default_model)
    prune(ours, "magnitude", 5.0)
    (tmp_path / "out.safetensors").unlink()
    code, out = _import(tmp_path, plain_state_dict(ours))
    assert code == 0
    assert sparsity_report(load(out))["compression"] == pytest.approx(sparsity_report(ours)["compression"])


def _broken(state: dict, how: str):
    state = dict(state)
    if how == "missing":
        state.pop("1.3.weight")
    elif how == "unexpected":
        state["1.9.weight"] = torch.zeros(2)
    elif how == "shape":
        state["1.3.weight"] = torch.zeros(3, 3)
    elif how == "integer":
        state["1.3.weight"] = state["1.3.weight"].long()
    elif how == "not-a-tensor":
        state["1.3.weight"] = [1.0, 2.0]
    elif how == "nan":
        state["1.3.weight"] = state["1.3.weight"].clone().fill_(float("nan"))
    elif how == "mask-not-binary":
        state["1.3.weight_mask"] = torch.full_like(state["1.3.weight"], 0.5)
    elif how == "mask-shape":
        state["1.3.weight_mask"] = torch.ones(2, 2)
    elif how == "complex":
        state["1.3.weight"] = state["1.3.weight"].to(torch.complex64)
    elif how == "int-keys":
        state[3] = torch.zeros(1)
    elif how == "empty":
        return {}
    elif how == "list":
        return list(state.values())
    elif how == "tensor":
        return state["1.3.weight"]
    return state


BROKEN = ["missing", "unexpected", "shape", "integer", "not-a-tensor", "nan", "mask-not-binary", "mask-shape",
          "complex", "int-keys", "empty", "list", "tensor"]


@pytest.mark.parametrize("how", BROKEN)
def test_import_refuses_a_state_dict_that_does_not_fit(capsys, tmp_path, default_model, how):
    weights, out = tmp_path / "w.pt", tmp_path / "out.safetensors"
    torch.save(_broken(default_model.state_dict(), how), weights)
    line = _refused(capsys, ["import", str(weights), "--out", str(out)])
    assert not out.exists()
    if how in ("missing", "shape", "integer", "not-a-tensor", "nan", "complex"):
        assert "'1.3.weight'" in line
    if how == "unexpected":
        assert "'1.9.weight'" in line
    if how.startswith("mask"):
        assert "'1.3.weight_mask'" in line


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04broken zip", b"\x80\x02}q\x00."[:-1]])
def test_import_refuses_corrupt_files(capsys, tmp_path, content):
    weights = tmp_path / "w.pt"
    weights.write_bytes(content)
    line = _refused(capsys, ["import", str(weights), "--out", str(tmp_path / "out.safetensors")])
    assert "not a weights-only PyTorch state dict" in line
    assert _refused(capsys, ["import", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.safetensors")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


# --------------------------------------------------------------------------------------------- e. full disk, unwritable

def _limited(limit: int):
    def apply() -> None:  # the child writes at most ``limit`` bytes per file: EFBIG, as a full disk gives ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _cli_with_file_limit(limit: int, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustprune", *argv], cwd=cwd, preexec_fn=_limited(limit),
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def _fails_on_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result
    err = result.stderr
    assert err.count("\n") == 1 and err.startswith("robustprune: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.strip()


def _assert_complete(folder: Path) -> None:
    """No temporaries, and every file present is whole: JSON parses, every JSONL line parses, safetensors load."""
    for path in folder.rglob("*"):
        assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            assert path.read_text().endswith("\n") or not path.read_text()
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".safetensors":
            load_file(str(path))


@pytest.mark.parametrize("command", [["export", "model.safetensors", "--format", "sparse"],
                                     ["train", "--set", "pretrain.epochs=0"]], ids=["export", "train"])
def test_a_full_disk_keeps_the_old_file(workdir, command):
    target = workdir / "x.safetensors"
    target.write_bytes(b"old content \x00\x01 precious")
    result = _cli_with_file_limit(10_000, *command, "--out", target.name, "--force", cwd=workdir)
    line = _fails_on_one_line(result)
    assert "File too large" in line and "x.safetensors" in line
    assert target.read_bytes() == b"old content \x00\x01 precious"
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("limit", [1_000, 100_000])
def test_run_on_a_full_disk_leaves_only_whole_files(tmp_path, limit):
    out = tmp_path / "run"
    result = _cli_with_file_limit(
        limit, "run", "--out", str(out), "--quiet", "--set", "pretrain.epochs=1", "--set", "finetune.epochs=1",
        "--set", "objective.steps=1", "--set", "evaluate.pgd_steps=1", "--set", "evaluate.n_samples=20",
        "--set", "evaluate.verifiers=[]", cwd=tmp_path)
    assert "File too large" in _fails_on_one_line(result)
    _assert_complete(out)
    if limit == 100_000:  # config.yaml fits; the first checkpoint does not
        assert (out / "config.yaml").is_file()


def test_metrics_lines_stay_whole_when_the_disk_fills(tmp_path):
    """append_jsonl on a disk that fills mid-line: the partial line is cut off, earlier lines stay."""
    path = tmp_path / "metrics.jsonl"
    code = ("import sys; from robustprune.infra.fileio import append_jsonl\n"
            "for i in range(1000): append_jsonl(sys.argv[1], {'epoch': i, 'loss': 0.123456789})\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], preexec_fn=_limited(1_000), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "File too large" in result.stderr
    lines = path.read_text().splitlines()
    assert 0 < len(lines) < 1000 and path.read_text().endswith("\n")
    assert [json.loads(line)["epoch"] for line in lines] == list(range(len(lines)))


UNWRITABLE = ["somefile/out", "/proc/robustprune-test/x", "/proc/robustprune-test.safetensors"]


@pytest.mark.parametrize("where", UNWRITABLE)
@pytest.mark.parametrize("command", ["run", "export", "import", "train"])
def test_unwritable_output_fails_on_one_line(no_training, workdir, capsys, monkeypatch, where, command):
    (workdir / "somefile").write_text("a regular file")
    if command == "train":  # train writes its checkpoint after training: let the stub hand back an empty history
        monkeypatch.setattr(pipeline, "pretrain", lambda *a, **k: [])
    argv = {"run": ["run", "--set", "pretrain.epochs=0"],
            "export": ["export", "model.safetensors", "--format", "sparse"],
            "import": ["import", "weights.pt"], "train": ["train", "--set", "pretrain.epochs=0"]}[command]
    capsys.readouterr()
    try:
        code = main([*argv, "--out", where])
    except Reached:
        pytest.fail(f"{command} --out {where} got to training before noticing the output cannot be written")
    err = capsys.readouterr().err
    assert code in (1, 2), (code, err)
    _error_line(err)
    assert (workdir / "somefile").read_text() == "a regular file"
    assert not Path(where).exists()

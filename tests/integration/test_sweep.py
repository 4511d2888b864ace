"""Sweeps and reports: a tiny sweep writes every file, resumes without recomputing, refuses a different config;
run folders get their plots and `robustprune report` re-renders runs and sweeps."""
from __future__ import annotations

import json
import sys

import pytest

from robustprune.cli import main
from robustprune.config import load_config
from robustprune.infra.errors import UserError
from robustprune.pipeline import run
from robustprune.sweep import sweep

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["pretrain.epochs=2", "finetune.epochs=1", "objective.steps=2", "evaluate.pgd_steps=3",
        "evaluate.verifiers=[]", "evaluate.n_samples=60", "evaluate.pgd_eps_fractions=[]"]


def assert_png(path, minimum=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > minimum, f"{path} is not a non-trivial PNG"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    result = sweep(load_config(None, TINY), out, [1, 4], ["benign", "pgd"], ["pgd"], quiet=True, log=lambda _: None)
    return out, result


def test_a_sweep_writes_records_tables_and_plots(tiny_sweep):
    out, result = tiny_sweep
    assert len(result["points"]) == 4 and len(list((out / "points").glob("*.json"))) == 4
    stored = json.loads((out / "sweep.json").read_text())
    assert stored["points"] == json.loads(json.dumps(result["points"]))
    for record in stored["points"]:
        assert record["finetune"] == "pgd" and record["compression"] in (1.0, 4.0)
        assert 0 <= record["pgd_acc"] <= record["benign_acc"] <= 1
        assert record["compression"] == 1.0 or record["sparsity"] == pytest.approx(0.75, abs=0.01)
        assert record["measured_compression"] == pytest.approx(record["compression"], rel=0.01)
    assert set(stored["dense"]) == {"benign", "pgd"}
    table = (out / "sweep.md").read_text()
    assert "Pre-trained with `benign`" in table and "| 4× |" in table and "![accuracy.png](plots/accuracy.png)" in table
    for name in ("accuracy.png", "retention.png"):
        assert_png(out / "plots" / name)
    assert stored["plots"] == ["plots/accuracy.png", "plots/retention.png"]  # relative to the sweep folder
    assert (out / "pretrained-benign.safetensors").is_file() and (out / "pretrained-pgd.safetensors").is_file()


def test_a_resumed_sweep_recomputes_nothing_finished(tiny_sweep, monkeypatch):
    out, result = tiny_sweep
    import robustprune.pipeline as pipeline
    tasks = sys.modules["robustprune.sweep.tasks"]
    (out / "points" / "pgd--pgd--magnitude--4x.json").unlink()  # as if interrupted before the last point
    calls = {"pretrain": 0, "points": []}
    monkeypatch.setattr(pipeline, "pretrain", lambda *a, **k: calls.__setitem__("pretrain", calls["pretrain"] + 1))
    real = tasks._point
    monkeypatch.setattr(tasks, "_point", lambda cfg, point, *a, **k: calls["points"].append(point.key)
                        or real(cfg, point, *a, **k))
    again = sweep(load_config(None, TINY), out, [1, 4], ["benign", "pgd"], ["pgd"], quiet=True, log=lambda _: None)
    assert calls == {"pretrain": 0, "points": ["pgd--pgd--magnitude--4x"]}
    def results(points):
        return [{k: v for k, v in p.items() if k not in ("time_s", "worker")} for p in json.loads(json.dumps(points))]
    assert results(again["points"]) == results(result["points"])  # seeded: the recomputed point is the same


def test_a_sweep_folder_of_another_config_is_refused(tiny_sweep):
    out, _ = tiny_sweep
    with pytest.raises(UserError, match="another config"):
        sweep(load_config(None, [*TINY, "threat.eps=0.1"]), out, [1, 4], ["benign"], ["pgd"], quiet=True,
              log=lambda _: None)


def test_report_rerenders_a_sweep(tiny_sweep, capsys):
    out, _ = tiny_sweep
    for name in ("accuracy.png", "retention.png"):
        (out / "plots" / name).unlink()
    (out / "sweep.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "sweep.md" in capsys.readouterr().out
    assert_png(out / "plots" / "accuracy.png") and (out / "sweep.md").is_file()


def test_a_run_embeds_its_plots_and_report_rerenders_them(tmp_path, capsys):
    report = run(load_config(None, TINY), tmp_path / "run", quiet=True, log=lambda _: None)
    plots = [tmp_path / "run" / "plots" / n for n in ("stages.png", "densities.png", "training.png")]
    assert report["artifacts"]["plots"] == [f"plots/{p.name}" for p in plots]  # relative to the run folder
    for plot in plots:
        assert_png(plot)
        plot.unlink()
    text = (tmp_path / "run" / "report.md").read_text()
    assert "![stages](plots/stages.png)" in text and "![training](plots/training.png)" in text
    assert "![densities](plots/densities.png)" in text and "| layer | weights | kept | density |" in text
    assert main(["report", str(tmp_path / "run")]) == 0
    assert all(p.is_file() for p in plots)


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--compression", "1,x"], "numbers separated by commas"),
    (["sweep", "--compression", "0.5,2"], "values >= 1"),
    (["sweep", "--compression", "2", "--rules", "magic"], "unknown pruning rule"),
    (["report", "NOWHERE"], "no report.json or sweep.json"),
])
def test_bad_sweep_and_report_requests_fail_in_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path) if a == "NOWHERE" else a for a in argv]
    if argv[0] == "sweep":
        argv += ["--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_tensorboard_scalars_sit_beside_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(load_config(None, [*TINY, "tensorboard=true"]), tmp_path / "run", quiet=True, log=lambda _: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/train_acc", "finetune/loss", "eval/benign_acc", "eval/pgd_acc"} <= tags
    losses = [e.value for e in events.Scalars("pretrain/loss")]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([e["loss"] for e in epochs if e["stage"] == "pretrain"])


def test_tensorboard_without_the_extra_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"robustprune\[tensorboard\]"):
        run(load_config(None, [*TINY, "tensorboard=true"]), tmp_path / "run", quiet=True, log=lambda _: None)
    assert not (tmp_path / "run").exists()

"""What a run needs, built and checked before anything is written: the data (with the validation hold-out), the
model (a registered architecture, the user's factory, or a network handed over in Python, optionally started from
given weights), the objectives, and dry runs of the pruning budget and of the bounds.

``pipeline.run``, the stage commands and the sweep build their inputs here, so a bad request fails in one line
(exit 2) before a folder is created.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from robustprune.bounds import build_graph
from robustprune.config import Config, ObjectiveConfig, ThreatConfig
from robustprune.config.schema import GIVEN_DATA
from robustprune.data import Dataset, hold_out, load_dataset
from robustprune.export.external import import_weights
from robustprune.infra.errors import UserError
from robustprune.infra.runtime import resolve_device
from robustprune.models import create_model, is_factory, trust_factory
from robustprune.models.factory import FACTORY_PATTERN
from robustprune.objectives import OBJECTIVES, Objective
from robustprune.pruning import PRUNERS, attach_learned_scores, prunable_layers, prune


def check_names(cfg: Config) -> None:
    """What the config could not check when it was read: the device exists here, and each objective trains for the
    threat's norm (a one-line error before anything runs). Registry names were checked when it was read."""
    resolve_device(cfg.device)
    build_objectives(cfg)


def build_objective(cfg: ObjectiveConfig, threat: ThreatConfig) -> Objective:
    """The objective named by ``cfg`` with its own settings, at ``cfg.eps`` (default: the threat's radius)."""
    return OBJECTIVES.get(cfg.name)(threat.eps if cfg.eps is None else cfg.eps, threat.norm, cfg.settings)


def build_objectives(cfg: Config) -> tuple[Objective, Objective]:
    """(pre-training, fine-tuning) objectives: the *same object* unless ``finetune_objective`` names another."""
    objective = build_objective(cfg.objective, cfg.threat)
    if cfg.finetune_objective is None:
        return objective, objective
    return objective, build_objective(cfg.finetune_objective, cfg.threat)


def check_prunable(cfg: Config, model: nn.Module) -> None:
    """Dry-run the pruning budget on a copy of ``model`` (the random streams untouched), so an unreachable request
    fails before anything is written."""
    p, trial = cfg.prune, copy.deepcopy(model)
    with torch.random.fork_rng():
        if PRUNERS.get(p.rule).learned:
            attach_learned_scores(trial, p.target_compression, p.scope, rule=p.rule, **p.budget_options())
        else:
            prune(trial, p.rule, p.target_compression, p.scope, seed=cfg.seed, **p.budget_options())


def check_boundable(cfg: Config, model: nn.Module) -> None:
    """A model the verifiers or a certified objective must bound has a bound class for every layer (else exit 2)."""
    sections = [s for s in (cfg.objective, cfg.finetune_objective) if s is not None]
    if any(OBJECTIVES.get(s.name).certified for s in sections) or (cfg.evaluate.verifiers and
                                                                    cfg.threat.norm == "linf"):
        build_graph(model)


def load_data(cfg: Config) -> Dataset:
    """The dataset, with ``data.val_fraction`` of the training images held out of training; evaluation then reports
    on them instead of the test images when ``evaluate.split`` is ``val`` (choosing settings never sees the test)."""
    if cfg.data.name == GIVEN_DATA:
        raise UserError("data.name: given means data handed over in Python (run(cfg, out, data=...)); name a "
                        "registered dataset here")
    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.path)
    if cfg.data.val_fraction == 0:
        return data
    train, val = hold_out(data.train, cfg.data.val_fraction)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"data.val_fraction {cfg.data.val_fraction:g} of {len(data.train)} training images leaves "
                        "an empty training or validation split")
    return Dataset(data.name, train, val if cfg.evaluate.split == "val" else data.test, data.num_classes)


def new_model(cfg: Config, data: Dataset) -> nn.Module:
    """The config's model for ``data`` — a registered architecture or the user's factory — started from
    ``model.init`` when given (weights only; a file that does not fit is refused in one line)."""
    if is_factory(cfg.model.name):
        trust_factory(cfg.model.name)  # the user's own config names it: checkpoints of this run may rebuild it
        mean = std = None
    else:
        mean, std = data.channel_stats()
    model = create_model(cfg.model.name, data.input_shape, data.num_classes, mean, std, cfg.model.kwargs)
    require_prunable(model, cfg.model.name)
    if cfg.model.init is not None:
        import_weights(model, cfg.model.init)
    return model


def given_model(net: nn.Module, data: Dataset) -> nn.Module:
    """A copy of a network handed over in Python (``run(cfg, out, model=net)``), with an ``arch`` that rebuilds it:
    its own, or its class called with no arguments (trusted: the caller handed it over)."""
    model = copy.deepcopy(net)
    if not isinstance(getattr(model, "arch", None), dict):
        cls = type(model)
        path = f"{cls.__module__}:{cls.__qualname__}"
        if not FACTORY_PATTERN.match(path):
            raise UserError(f"the model's class {path} cannot be recorded for a rebuild: define it at module level, "
                            "or give model: {name: 'package.module:function'}")
        model.arch = {"factory": path, "kwargs": {}, "input_shape": list(data.input_shape),
                      "num_classes": int(data.num_classes)}
    if "factory" in model.arch:
        trust_factory(model.arch["factory"])
    require_prunable(model, type(net).__name__)
    return model


def require_prunable(model: nn.Module, name: str) -> None:
    if next(prunable_layers(model), None) is None:
        raise UserError(f"the model {name} has no Conv2d or Linear layer to prune")

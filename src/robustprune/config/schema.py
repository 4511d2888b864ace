"""The configuration schema: one frozen dataclass per config section, each validating its own values.

``loading.py`` fills them from defaults < YAML file < ``--set`` overrides; a value out of range raises
:class:`~robustprune.infra.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from robustprune.attacks import ATTACKS, Threat
from robustprune.bounds import VERIFIERS
from robustprune.data import DATASETS
from robustprune.infra.errors import UserError
from robustprune.models import MODELS
from robustprune.models.factory import check_factory_name, is_factory
from robustprune.objectives import OBJECTIVES
from robustprune.pruning import PRUNERS, SCOPES


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


_REPR = reprlib.Repr()  # a value quoted in a message: bounded, so a YAML alias bomb or a deep list stays one short line
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _show(value: Any) -> str:
    return _REPR.repr(value)


#: ``data.name`` of a run whose data were handed over in Python (``run(..., data=)``, ``compress``).
GIVEN_DATA = "given"


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # a registered dataset (robustprune list datasets); "given": handed over in Python
    root: str | None = None  # data root; default $ROBUSTPRUNE_DATA, else ~/.cache/robustprune
    path: str | None = None  # a file, for datasets read from one file (npz)
    batch_size: int = 64
    eval_batch_size: int = 500
    val_fraction: float = 0.0  # hold this fraction of the training images out of training (evaluate.split: val)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        _check(0 <= self.val_fraction < 1, f"val_fraction must lie in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    # a registered model (robustprune list models), or the user's own network: "package.module:function", an
    # importable callable returning an nn.Module that takes inputs in [0, 1] (called with ``kwargs``)
    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)  # arguments of a factory (JSON values)
    init: str | None = None  # start from these weights (.safetensors or weights-only .pt state dict)

    def __post_init__(self) -> None:
        if is_factory(self.name):
            check_factory_name(self.name)
        else:
            _registered(MODELS, self.name, "name")
            _check(not self.kwargs, f"kwargs are for a model factory (package.module:function); {self.name} takes none")


#: The config's ``threat`` section is the attacks' threat model itself.
ThreatConfig = Threat


@dataclass(frozen=True)
class ObjectiveConfig:
    """``objective: {name: ..., eps: ..., <that objective's own settings>}``: the settings are the objective class's
    ``Settings`` dataclass (``robustprune.objectives``), validated by it; ``eps`` (default ``threat.eps``) is common."""

    name: str = "pgd"  # a registered objective (robustprune list objectives)
    eps: float | None = None  # training radius; default threat.eps
    settings: Any = None  # the objective's own settings; None: its defaults

    def __post_init__(self) -> None:
        cls = OBJECTIVES.get(self.name)
        _check(self.eps is None or self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        if self.settings is None:
            object.__setattr__(self, "settings", cls.Settings())
        _check(isinstance(self.settings, cls.Settings),
               f"settings of objective {self.name} must be {cls.Settings.__name__}, got {type(self.settings).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps, **dataclasses.asdict(self.settings)}

    def renamed(self, name: str) -> "ObjectiveConfig":
        """The objective ``name`` with this one's radius and the settings both declare (``steps`` carries from pgd
        to trades; κ does not carry to pgd); the new objective's defaults for the rest."""
        return ObjectiveConfig(name, self.eps, shared_settings(self.settings, OBJECTIVES.get(name).Settings))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], prefix: str, build) -> "ObjectiveConfig":
        """From a config section: ``name`` and ``eps`` here, every other key a setting of the named objective."""
        name = values.get("name", cls.name)
        _check(isinstance(name, str), f"{prefix}name must be a string, got {_show(name)}")
        settings_cls = _registered(OBJECTIVES, name, prefix + "name").Settings
        _refuse_foreign_settings(values, name, prefix)
        common = build(cls, {k: v for k, v in values.items() if k in ("name", "eps")}, prefix)
        settings = build(settings_cls, {k: v for k, v in values.items() if k not in ("name", "eps")}, prefix,
                         f"objective {name}")
        return dataclasses.replace(common, settings=settings)


OBJECTIVE_SECTIONS = ("objective", "finetune_objective")


def own_settings(section: dict[str, Any], name: str) -> dict[str, Any]:
    """The keys of an objective section that ``name`` takes (``name``, ``eps`` and its declared settings); all of
    them for a name that is not registered (the error comes when the section is read)."""
    if name not in OBJECTIVES:
        return dict(section)
    names = {"name", "eps"} | {f.name for f in dataclasses.fields(OBJECTIVES.get(name).Settings)}
    return {k: v for k, v in section.items() if k in names}


def _refuse_foreign_settings(values: dict[str, Any], name: str, prefix: str) -> None:
    """A key that is another objective's setting gets a message saying whose (not a "did you mean")."""
    own = {f.name for f in dataclasses.fields(OBJECTIVES.get(name).Settings)} | {"name", "eps"}
    for key in values:
        owners = [o for o in OBJECTIVES.names() if o != name and key in
                  {f.name for f in dataclasses.fields(OBJECTIVES.get(o).Settings)}]
        if key not in own and owners:
            raise UserError(f"'{prefix}{key}' is a setting of objective {', '.join(owners)}, not of {name} (its "
                            f"settings: {', '.join(sorted(own - {'name', 'eps'})) or 'none'})")


def shared_settings(settings: Any, target: type) -> Any:
    """``target`` settings taking every value of ``settings`` whose field ``target`` also declares."""
    names = {f.name for f in dataclasses.fields(target)}
    return target(**{k: v for k, v in dataclasses.asdict(settings).items() if k in names})


def _registered(registry, name: str, key: str) -> Any:
    """``registry.get(name)``, its "did you mean" message qualified by the config key."""
    if name not in registry:
        raise UserError(f"{key}: {registry.unknown_message(name)}")
    return registry.get(name)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | onecycle | step | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the epochs where lr *= gamma
    gamma: float = 0.1
    eps_warmup_epochs: float = 0.0  # ramp the objective's ε linearly from 0 over these epochs
    clean_epochs: float = 0.0  # epochs at ε = 0 before the ramp starts (certified training's warm-up)

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _check(self.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        schedules = ("cosine", "onecycle", "step", "constant")
        _check(self.schedule in schedules, f"schedule must be one of {', '.join(schedules)}, got {self.schedule!r}")
        _check(all(0 < m < 1 for m in self.milestones), "milestones must be fractions in (0, 1)")
        _check(self.gamma > 0, f"gamma must be > 0, got {self.gamma}")
        _check(self.eps_warmup_epochs >= 0, "eps_warmup_epochs must be >= 0")
        _check(self.clean_epochs >= 0, "clean_epochs must be >= 0")


@dataclass(frozen=True)
class PruneConfig:
    rule: str = "magnitude"  # a registered pruning rule (robustprune list pruners)
    # layer: the same rate in every layer | global: one threshold over all layers | erk: Erdős–Rényi-Kernel rates
    # (Evci et al. 2020), density ∝ (n_in + n_out + kh + kw) / (n_in·n_out·kh·kw), so small layers stay denser
    scope: str = "layer"
    compression: float | None = 10.0  # prunable weights / nonzero prunable weights
    sparsity: float | None = None  # = 1 - 1/compression; give one of the two
    keep_first_dense: bool = False  # never prune the first Conv/Linear layer
    keep_last_dense: bool = False  # never prune the last (classifier) layer
    min_density: float = 0.0  # every pruned layer keeps at least this fraction of its weights (or channels)
    schedule: str = "oneshot"  # oneshot | iterative (the seed: geometric steps, fine-tuning between rounds)
    rounds: int = 3  # iterative: compression^(r/rounds) after round r
    round_epochs: int = 1  # iterative: fine-tuning epochs (finetune settings) between rounds
    score_training: TrainConfig = field(  # hydra, harp: the score phase (weights frozen, same objective)
        default_factory=lambda: TrainConfig(epochs=5, optimizer="sgd", lr=0.1, schedule="cosine"))
    rate_penalty: float = 1.0  # harp: weight of max(0, kept fraction · compression - 1) in the score-phase loss

    def __post_init__(self) -> None:
        _registered(PRUNERS, self.rule, "rule")
        _check(self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        _check(0 <= self.min_density <= 1, f"min_density must lie in [0, 1], got {self.min_density}")
        _check(self.schedule in ("oneshot", "iterative"), f"schedule must be 'oneshot' or 'iterative', got {self.schedule!r}")
        _check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _check(self.round_epochs >= 0, f"round_epochs must be >= 0, got {self.round_epochs}")
        _check(math.isfinite(self.rate_penalty) and self.rate_penalty >= 0,
               f"rate_penalty must be a finite number >= 0, got {self.rate_penalty}")
        _check((self.compression is None) != (self.sparsity is None), "compression or sparsity: give exactly one of the two")
        if self.compression is not None:
            _check(math.isfinite(self.compression) and self.compression >= 1,
                   f"compression must be a finite number >= 1, got {self.compression}")
        if self.sparsity is not None:
            _check(0 <= self.sparsity < 1, f"sparsity must lie in [0, 1), got {self.sparsity}")

    @property
    def target_compression(self) -> float:
        return self.compression if self.compression is not None else 1.0 / (1.0 - self.sparsity)  # type: ignore[operator]

    def budget_options(self) -> dict[str, bool | float]:
        """The keyword options of ``pruning.prune`` / ``attach_learned_scores`` that shape the per-layer budget."""
        return {"keep_first_dense": self.keep_first_dense, "keep_last_dense": self.keep_last_dense,
                "min_density": self.min_density}

    def round_targets(self) -> list[float]:
        """Compression after each round: the target alone (oneshot) or geometric steps to it (iterative)."""
        if self.schedule == "oneshot":
            return [self.target_compression]
        return [self.target_compression ** (r / self.rounds) for r in range(1, self.rounds + 1)]


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` section. Each attack's settings are its class's ``Settings`` (``robustprune.attacks``), given
    as ``<attack>_<setting>`` keys (``pgd_steps``, ``autoattack_n_samples``, ``square_queries``)."""

    n_samples: int | None = None  # evaluate on the first n test samples (None: all)
    verifiers: tuple[str, ...] = ("ibp", "crown")  # sound verifiers (robustprune list verifiers); () for none
    verify_n_samples: int | None = None  # verify only the first n evaluated samples (full CROWN on big models)
    verify_timeout: float = 30.0  # seconds per sample for bab's exact search (then the sample is unknown)
    attacks: tuple[str, ...] = ("pgd",)  # robustprune list attacks: pgd, fgsm, autoattack, square
    smoothing_sigma: float | None = None  # randomized-smoothing certificate with this σ (None: off)
    smoothing_n0: int = 100  # selection samples (Cohen et al.)
    smoothing_n: int = 1000  # estimation samples
    smoothing_alpha: float = 0.001  # failure probability of each certificate
    smoothing_n_samples: int | None = 100  # certify the first n evaluated samples
    smoothing_radii: tuple[float, ...] = (0.25, 0.5)  # L2 radii of the reported certified accuracies
    split: str = "test"  # test | val: report on the test images, or on data.val_fraction held out of training
    masking_check: bool = True  # Square (gradient-free) after the gradient attacks, unless a gradient-free one runs
    masking_threshold: float = 0.02  # warn when Square breaks more than this fraction the gradient attacks left
    attack_settings: Mapping[str, Any] = field(default_factory=dict)  # attack name → its Settings (defaults filled)

    def __post_init__(self) -> None:
        for attack in self.attacks:
            _registered(ATTACKS, attack, "attacks")
        for method in self.verifiers:
            _registered(VERIFIERS, method, "verifiers")
        _check(len(set(self.attacks)) == len(self.attacks), "attacks must not repeat a name")
        _check(len(set(self.verifiers)) == len(self.verifiers), "verifiers must not repeat a name")
        _check(self.smoothing_sigma is None or self.smoothing_sigma > 0, "smoothing_sigma must be > 0")
        _check(self.smoothing_n0 >= 1 and self.smoothing_n >= 1, "smoothing_n0 and smoothing_n must be >= 1")
        _check(0 < self.smoothing_alpha < 1, "smoothing_alpha must lie in (0, 1)")
        _check(self.smoothing_n_samples is None or self.smoothing_n_samples >= 1, "smoothing_n_samples must be >= 1")
        _check(all(r >= 0 for r in self.smoothing_radii), "smoothing_radii must be >= 0")
        _check(self.split in ("test", "val"), f"split must be test or val, got {self.split!r}")
        _check(0 <= self.masking_threshold < 1, "masking_threshold must lie in [0, 1)")
        _check(self.n_samples is None or self.n_samples >= 1, "n_samples must be >= 1")
        _check(self.verify_n_samples is None or self.verify_n_samples >= 1, "verify_n_samples must be >= 1")
        _check(self.verify_timeout > 0, "verify_timeout must be > 0 seconds")
        filled = {name: self.attack_settings.get(name) or ATTACKS.get(name).Settings() for name in ATTACKS.names()}
        object.__setattr__(self, "attack_settings", filled)

    def settings(self, attack: str) -> Any:
        """The settings of ``attack`` (its defaults for an attack registered after this config was built)."""
        return self.attack_settings.get(attack) or ATTACKS.get(attack).Settings()

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "attack_settings"}
        for name, settings in self.attack_settings.items():
            own.update({f"{name}_{k}": v for k, v in dataclasses.asdict(settings).items()})
        return own

    @classmethod
    def from_mapping(cls, values: dict[str, Any], prefix: str, build) -> "EvalConfig":
        """From a config section: the general keys here, ``<attack>_<setting>`` keys to that attack's settings."""
        general = {f.name for f in dataclasses.fields(cls)} - {"attack_settings"}
        per_attack: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if key in general:
                continue
            attack = next((a for a in sorted(ATTACKS.names(), key=len, reverse=True)
                           if str(key).startswith(a + "_")), None)
            if attack is None:
                known = sorted(general | set(cls().to_dict()))
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else f" (known: {', '.join(known)})"
                raise UserError(f"unknown config key {_show(prefix + str(key))}{hint}")
            per_attack.setdefault(attack, {})[key[len(attack) + 1:]] = value
        settings = {a: build(ATTACKS.get(a).Settings, v, f"{prefix}{a}_", f"attack {a}") for a, v in per_attack.items()}
        own = build(cls, {k: v for k, v in values.items() if k in general}, prefix)
        return dataclasses.replace(own, attack_settings={**own.attack_settings, **settings})


@dataclass(frozen=True)
class Config:
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune_objective: ObjectiveConfig | None = None  # None: fine-tune with the same objective object
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=60, lr=3e-3))
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=3e-3))
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tensorboard: bool = False  # also write TensorBoard scalars to RUN/tensorboard (extra robustprune[tensorboard])
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for training (attacks included); evaluation stays fp32
    channels_last: bool = False  # train in channels-last memory layout (pays on GPUs with tensor cores)
    compile: bool = False  # torch.compile the model for training steps and training attacks (first epoch compiles)
    threads: int | None = None  # intra-op CPU threads; None: torch's default (OMP_NUM_THREADS, else one per core)

    def __post_init__(self) -> None:
        _check(-2**63 <= self.seed < 2**63, f"seed must fit in 64 bits (torch.manual_seed), got {self.seed}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.threads is None or 1 <= self.threads <= 4096, f"threads must be 1..4096, got {self.threads}")
        _check(self.precision in ("fp32", "bf16", "fp16"),
               f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.data.name != GIVEN_DATA:
            _registered(DATASETS, self.data.name, "data.name")
        _check(self.evaluate.split == "test" or self.data.val_fraction > 0,
               "evaluate.split: val needs data.val_fraction > 0 (the images held out of training)")

    def to_dict(self) -> dict[str, Any]:
        return _plain({f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _section_dict(value: Any) -> Any:
    """A section as plain values: its own ``to_dict`` (sections that hold registry-owned settings) or its fields."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively, so the dict dumps as plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

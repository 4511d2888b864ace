"""The configuration schema: one frozen dataclass per config section, each validating its own values.

``loading.py`` fills them from defaults < YAML file < ``--set`` overrides; a value out of range raises
:class:`~robustprune.infra.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

from robustprune.infra.errors import UserError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


_REPR = reprlib.Repr()  # a value quoted in a message: bounded, so a YAML alias bomb or a deep list stays one short line
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _show(value: Any) -> str:
    return _REPR.repr(value)


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # a registered dataset (robustprune list datasets)
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
    name: str = "mlp"  # a registered model (robustprune list models)


@dataclass(frozen=True)
class ThreatConfig:
    norm: str = "linf"
    eps: float = 0.2  # in pixel units: inputs live in [0, 1]

    def __post_init__(self) -> None:
        _check(self.norm in ("linf", "l2"), f"norm must be 'linf' or 'l2', got {self.norm!r}")
        _check(self.eps >= 0, f"eps must be >= 0, got {self.eps}")


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "pgd"  # a registered objective (robustprune list objectives)
    eps: float | None = None  # training radius; default threat.eps
    steps: int = 10  # attack steps per training batch (pgd)
    step_size: float | None = None  # default 2.5 * eps / steps (Madry et al.)
    random_start: bool = True
    kappa_start: float = 1.0  # ibp / crown-ibp: weight of the clean loss at the start of the ε ramp ...
    kappa_end: float = 0.5  # ... and at its end (Gowal et al. 2018)
    beta_start: float = 1.0  # crown-ibp: weight of the CROWN-IBP bound against IBP at the start of the ramp ...
    beta_end: float = 0.0  # ... and at its end (Zhang et al. 2020)
    trades_beta: float = 6.0  # trades: weight of the KL robustness term (Zhang et al. 2019)
    mart_lambda: float = 5.0  # mart: weight of the misclassification-aware KL term (Wang et al. 2020)
    noise_sd: float = 0.25  # smooth: σ of the Gaussian noise added to training inputs (Cohen et al. 2019)

    def __post_init__(self) -> None:
        _check(self.trades_beta >= 0, f"trades_beta must be >= 0, got {self.trades_beta}")
        _check(self.mart_lambda >= 0, f"mart_lambda must be >= 0, got {self.mart_lambda}")
        _check(self.noise_sd > 0, f"noise_sd must be > 0, got {self.noise_sd}")
        _check(self.eps is None or self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        for key in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            _check(0 <= getattr(self, key) <= 1, f"{key} must be in [0, 1], got {getattr(self, key)}")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.step_size is None or self.step_size > 0, "step_size must be > 0")


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
        scopes = ("layer", "global", "erk")
        _check(self.scope in scopes, f"scope must be one of {', '.join(scopes)}, got {self.scope!r}")
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
    pgd_steps: int = 50
    pgd_restarts: int = 1  # a sample counts as robust only if it survives every restart
    pgd_step_size: float | None = None  # default 2.5 * eps / steps
    n_samples: int | None = None  # evaluate on the first n test samples (None: all)
    verifiers: tuple[str, ...] = ("ibp", "crown")  # sound verifiers (robustprune list verifiers); () for none
    verify_n_samples: int | None = None  # verify only the first n evaluated samples (full CROWN on big models)
    attacks: tuple[str, ...] = ("pgd",)  # robustprune list attacks: pgd, fgsm, autoattack, square
    pgd_loss: str = "ce"  # ce | margin (Carlini-Wagner), for pgd and fgsm
    pgd_eps_fractions: tuple[float, ...] = (0.5,)  # PGD also at these fractions of ε: accuracy must not rise with ε
    autoattack_attacks: tuple[str, ...] = ()  # subset of apgd-ce, apgd-t, fab-t, square (empty: all, standard)
    autoattack_n_samples: int | None = None  # AutoAttack on the first n evaluated samples only (CPU budgets)
    smoothing_sigma: float | None = None  # randomized-smoothing certificate with this σ (None: off)
    smoothing_n0: int = 100  # selection samples (Cohen et al.)
    smoothing_n: int = 1000  # estimation samples
    smoothing_alpha: float = 0.001  # failure probability of each certificate
    smoothing_n_samples: int | None = 100  # certify the first n evaluated samples
    smoothing_radii: tuple[float, ...] = (0.25, 0.5)  # L2 radii of the reported certified accuracies
    split: str = "test"  # test | val: report on the test images, or on data.val_fraction held out of training
    masking_check: bool = True  # Square (gradient-free) after the gradient attacks, unless AutoAttack runs
    square_queries: int = 300  # queries per sample of that check (AutoAttack's own Square uses 5,000)
    square_n_samples: int | None = None  # the check on the first n evaluated samples only (None: all)
    masking_threshold: float = 0.02  # warn when Square breaks more than this fraction the gradient attacks left

    def __post_init__(self) -> None:
        _check(len(set(self.attacks)) == len(self.attacks), "attacks must not repeat a name")
        _check(self.pgd_loss in ("ce", "margin"), f"pgd_loss must be ce or margin, got {self.pgd_loss!r}")
        _check(all(0 < f < 1 for f in self.pgd_eps_fractions), "pgd_eps_fractions must lie in (0, 1)")
        _check(self.autoattack_n_samples is None or self.autoattack_n_samples >= 1,
               "autoattack_n_samples must be >= 1")
        _check(self.smoothing_sigma is None or self.smoothing_sigma > 0, "smoothing_sigma must be > 0")
        _check(self.smoothing_n0 >= 1 and self.smoothing_n >= 1, "smoothing_n0 and smoothing_n must be >= 1")
        _check(0 < self.smoothing_alpha < 1, "smoothing_alpha must lie in (0, 1)")
        _check(self.smoothing_n_samples is None or self.smoothing_n_samples >= 1, "smoothing_n_samples must be >= 1")
        _check(all(r >= 0 for r in self.smoothing_radii), "smoothing_radii must be >= 0")
        _check(self.split in ("test", "val"), f"split must be test or val, got {self.split!r}")
        _check(self.square_queries >= 1, "square_queries must be >= 1")
        _check(self.square_n_samples is None or self.square_n_samples >= 1, "square_n_samples must be >= 1")
        _check(0 <= self.masking_threshold < 1, "masking_threshold must lie in [0, 1)")
        _check(self.pgd_steps >= 0, "pgd_steps must be >= 0 (0 disables the attack)")
        _check(self.pgd_restarts >= 1, "pgd_restarts must be >= 1")
        _check(self.pgd_step_size is None or self.pgd_step_size > 0, "pgd_step_size must be > 0")
        _check(self.n_samples is None or self.n_samples >= 1, "n_samples must be >= 1")
        _check(self.verify_n_samples is None or self.verify_n_samples >= 1, "verify_n_samples must be >= 1")
        _check(len(set(self.verifiers)) == len(self.verifiers), "verifiers must not repeat a name")


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
        _check(self.evaluate.split == "test" or self.data.val_fraction > 0,
               "evaluate.split: val needs data.val_fraction > 0 (the images held out of training)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively, so the dict dumps as plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

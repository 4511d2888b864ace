"""Building the typed configuration: defaults < YAML file < ``--set a.b=value`` overrides.

Every key is checked against the dataclasses of ``schema.py`` (unknown keys get a "did you mean"), every value against
its field type and range, and "8/255" is read with :class:`fractions.Fraction` — never ``eval``. Any problem raises
:class:`~robustprune.infra.errors.UserError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from robustprune.config.schema import OBJECTIVE_SECTIONS, Config, EvalConfig, _check, _show, own_settings
from robustprune.infra.errors import UserError


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the field's annotated type, or raise UserError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(annotation):
        _check(isinstance(value, dict), f"{key} must be a mapping of settings, got {_show(value)}")
        return _build(annotation, value, key + ".")
    if origin is dict:
        _check(isinstance(value, dict) and all(isinstance(k, str) for k in value),
               f"{key} must be a mapping with string keys, got {_show(value)}")
        return dict(value)
    if origin is tuple:
        (inner, _) = typing.get_args(annotation)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(items))
    if annotation is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {_show(value)}")
        return value
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
        _check(ok, f"{key} must be an integer, got {_show(value)}")
        return value
    if annotation is float:
        return _to_float(value, key)
    if annotation is str:
        _check(isinstance(value, str), f"{key} must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _to_float(value: Any, key: str) -> float:
    """A number, or a string like '8/255' or '0.3' read exactly with Fraction (never eval)."""
    if isinstance(value, bool):
        raise UserError(f"{key} must be a number, got {_show(value)}")
    if isinstance(value, (int, float)):
        number = float(value) if isinstance(value, float) or abs(value) < 2**1024 else math.inf  # e.g. 10**400
    elif isinstance(value, str):
        text = value.strip()
        try:  # float() for plain numbers: Fraction("1e999999999") would build a billion-digit integer
            number = float(Fraction(text)) if "/" in text else float(text)
        except OverflowError:  # e.g. "1" * 400 + "/3": too large for a float
            number = math.inf
        except (ValueError, ZeroDivisionError):
            raise UserError(f"{key} must be a number like 0.3 or 8/255, got {_show(value)}") from None
    else:
        raise UserError(f"{key} must be a number, got {_show(value)}")
    _check(math.isfinite(number), f"{key} must be finite, got {_show(value)}")
    return number


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a (partial) dict; missing keys keep their defaults. A section holding
    settings owned by a registered class (``objective``, ``evaluate``'s attacks) reads itself (``from_mapping``)."""
    if hasattr(cls, "from_mapping"):
        return cls.from_mapping(values, prefix, _build_fields)
    return _build_fields(cls, values, prefix)


def _build_fields(cls: type, values: dict[str, Any], prefix: str = "", owner: str | None = None) -> Any:
    """``cls`` from its own fields; ``owner`` names whose settings they are, for the unknown-key message."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and hints[f.name] is not Any
             and typing.get_origin(hints[f.name]) is not typing.get_origin(Mapping)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise UserError(_unknown_key(prefix, str(key), names, owner))
        kwargs[key] = _convert(_over_field_default(cls, key, value), hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except UserError as err:  # validation messages start with the field's own name: qualify it with its section
        raise UserError(f"{prefix}{err}") from None


def _unknown_key(prefix: str, key: str, names: list[str], owner: str | None) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown config key {_show(prefix + key)}; did you mean '{prefix}{close[0]}'?"
    if owner is not None:
        return (f"{_show(prefix + key)} is not a setting of {owner} (its settings: "
                f"{', '.join(prefix + n for n in names) or 'none'})")
    return f"unknown config key {_show(prefix + key)} (known: {', '.join(names)})"


def _over_field_default(cls: type, key: str, value: Any) -> Any:
    """A partial dict for a nested section keeps the section's defaults *as this class sets them*.

    ``Config.pretrain`` defaults to 60 epochs at lr 3e-3 while a bare ``TrainConfig`` has 10 at 1e-3: setting only
    ``pretrain.clean_epochs`` must keep the former. Sections that read themselves keep their own defaults.
    """
    field_ = next(f for f in dataclasses.fields(cls) if f.name == key)
    if not isinstance(value, dict) or field_.default_factory is dataclasses.MISSING:
        return value
    default = field_.default_factory()
    if not dataclasses.is_dataclass(default) or hasattr(default, "from_mapping"):
        return value
    return _merge(dataclasses.asdict(default), value)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; giving one of prune.compression / prune.sparsity clears the other."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    for key, other in (("compression", "sparsity"), ("sparsity", "compression")):
        if update.get(key) is not None and other not in update and other in merged:
            merged[other] = None
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` → {"a": {"b": value}}; the value is read as a YAML scalar (so 8/255 stays a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.isidentifier() for p in parts):
        raise UserError(f"malformed --set {text!r}: expected key=value, e.g. --set threat.eps=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        raise UserError(f"malformed --set {text!r}: cannot read the value {raw!r}") from None
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a >4300-digit int, bad UTF-8
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read config {path}: {first}") from None
    _check(isinstance(values, dict), f"config {path} must be a mapping of settings at the top level")
    return values


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), base: dict[str, Any] | None = None) -> Config:
    """Defaults ← ``base`` (e.g. a checkpoint's config) ← YAML file ← ``--set`` overrides → validated Config."""
    _check(base is None or isinstance(base, dict), f"a checkpoint's stored config must be a mapping, got {_show(base)}")
    values: dict[str, Any] = _stored(base or {})
    if path is not None:
        file_values = read_yaml(path)
        file_values.setdefault("name", Path(path).stem)
        values = _layer(values, file_values)
    for text in overrides:
        values = _layer(values, parse_override(text))
    _fill_merge_defaults(values)
    return _build(Config, values)


def _fill_merge_defaults(values: dict[str, Any]) -> None:
    """A sparsity given alone must not collide with the default compression."""
    prune = values.get("prune")
    if isinstance(prune, dict) and prune.get("sparsity") is not None and "compression" not in prune:
        prune["compression"] = None


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return _build(Config, _stored(values))


def load_stored(path: str | Path) -> Config:
    """A config robustprune wrote (a run's or a sweep's ``config.yaml``), read as it was stored."""
    return config_from_dict(read_yaml(path))


def _layer(values: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``values``; an update that names another objective drops the settings of the one it
    replaces that the new one does not declare (pgd's ``steps`` carry over to trades, not to ibp)."""
    values = dict(values)
    for key in OBJECTIVE_SECTIONS:
        old, new = values.get(key), update.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and "name" in new and new["name"] != old.get("name"):
            values[key] = own_settings(old, new["name"])
    return _merge(values, update)


def _stored(values: dict[str, Any]) -> dict[str, Any]:
    """A config robustprune wrote (a checkpoint's, config.yaml): before objectives owned their settings every
    objective section listed every objective's settings; the ones its objective does not declare are dropped."""
    values = dict(values)
    for key in OBJECTIVE_SECTIONS:
        if isinstance(values.get(key), dict) and isinstance(values[key].get("name"), str):
            values[key] = own_settings(values[key], values[key]["name"])
    return values


def eval_config(**values: Any) -> EvalConfig:
    """An ``evaluate`` section from keyword values as a config file writes them (``pgd_steps=20``,
    ``autoattack_n_samples=100``), checked like one."""
    return _build(EvalConfig, values, "evaluate.")

from pathlib import Path

import pytest

from robustprune.config import Config, config_from_dict, load_config, parse_override
from robustprune.infra.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_equal_the_digits_pgd_config():
    """configs/digits-pgd.yaml is the embedded default, setting for setting."""
    from_file = load_config(REPO / "configs" / "digits-pgd.yaml").to_dict()
    default = Config().to_dict()
    assert from_file.pop("name") == "digits-pgd"
    default.pop("name")
    assert from_file == default


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_set_overrides_nested_values_and_fractions():
    cfg = load_config(None, ["threat.eps=8/255", "pretrain.epochs=3", "model.name=mlp", "objective.random_start=false"])
    assert cfg.threat.eps == pytest.approx(8 / 255)
    assert cfg.pretrain.epochs == 3 and cfg.model.name == "mlp" and cfg.objective.settings.random_start is False


def test_yaml_fraction_is_read_exactly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("threat:\n  eps: 2/10\nname: mine\n")
    cfg = load_config(path)
    assert cfg.threat.eps == 0.2 and cfg.name == "mine"


def test_sparsity_alone_replaces_the_default_compression():
    cfg = load_config(None, ["prune.sparsity=0.9"])
    assert cfg.prune.compression is None and cfg.prune.target_compression == pytest.approx(10.0)
    base = Config().to_dict()
    cfg = load_config(None, ["prune.sparsity=0.5"], base=base)
    assert cfg.prune.target_compression == pytest.approx(2.0)
    cfg = load_config(None, ["prune.compression=4"], base=cfg.to_dict())
    assert cfg.prune.sparsity is None and cfg.prune.compression == 4


def test_round_trip_through_dict():
    cfg = load_config(None, ["threat.eps=0.1", "pretrain.milestones=[0.3, 0.6]"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("threat.eps=-0.1", "threat.eps must be >= 0"),
        ("prune.compression=0.5", "compression must be a finite number >= 1"),
        ("prune.sparsity=1.0", "sparsity must lie in [0, 1)"),
        ("prune.sparsity=-0.1", "sparsity must lie in [0, 1)"),
        ("pretrain.epoch=3", "did you mean 'pretrain.epochs'"),
        ("pretrain.epochs=many", "must be an integer"),
        ("pretrain.epochs=2.5", "must be an integer"),
        ("threat.eps=__import__('os')", "must be a number like 0.3 or 8/255"),
        ("threat.eps=1/0", "must be a number"),
        ("threat=3", "threat must be a mapping"),
        ("objective.random_start=maybe", "must be true or false"),
        ("pretrain.optimizer=rmsprop", "optimizer must be"),
        ("thret.eps=0.1", "did you mean 'threat'"),
        ("threat.eps", "malformed --set"),
        ("=3", "malformed --set"),
        ("a..b=3", "malformed --set"),
    ],
)
def test_bad_values_are_one_line_user_errors(override, message):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("threat: [unclosed\n")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listy)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=8/255") == {"a": "8/255"}
    assert parse_override("a=null") == {"a": None}

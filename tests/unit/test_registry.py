import pytest

from robustprune.infra.errors import UserError
from robustprune.registry import Registry


def test_register_get_names():
    reg: Registry = Registry("thing")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    assert reg.get("alpha") == 1 and reg.names() == ["alpha", "beta"] and "beta" in reg


def test_unknown_name_suggests_the_closest():
    reg: Registry = Registry("thing")
    reg.register("magnitude")(1)
    with pytest.raises(UserError, match=r"unknown thing 'magnitud'; did you mean 'magnitude'\?"):
        reg.get("magnitud")


def test_unknown_name_without_close_match_lists_choices():
    reg: Registry = Registry("thing")
    reg.register("magnitude")(1)
    with pytest.raises(UserError) as info:
        reg.get("zzz")
    assert "did you mean" not in str(info.value) and "magnitude" in str(info.value)


def test_double_registration_is_a_bug():
    reg: Registry = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(RuntimeError):
        reg.register("a")(2)

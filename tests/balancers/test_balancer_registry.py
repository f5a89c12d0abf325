import pytest

from lightning_mtl.balancers import BALANCERS, CAGrad, Balancer, Static, resolve_balancer

ALL_NAMES = [
    "static", "uw", "dwa", "rlw", "gls", "imtll", "famo", "stch",
    "mgda", "pcgrad", "cagrad", "graddrop", "gradvac", "imtlg", "nashmtl", "alignedmtl", "upgrad", "dualproj",
    "config", "gradnorm", "dbmtl",
]  # fmt: skip
NEEDS_SOLVERS = {"cagrad"}


def test_registry_holds_every_method_by_lower_case_name():
    assert sorted(BALANCERS) == sorted(ALL_NAMES)
    for name, cls in BALANCERS.items():
        assert cls.__name__.lower() == name
        assert cls.needs in ("losses", "gramian", "gradients")


@pytest.mark.parametrize("name", sorted(set(ALL_NAMES) - NEEDS_SOLVERS))
def test_every_name_resolves_case_insensitively(name):
    balancer = resolve_balancer(name.upper())
    assert isinstance(balancer, BALANCERS[name])


def test_instances_and_none_resolve():
    assert isinstance(resolve_balancer(None), Static)
    static = Static()
    assert resolve_balancer(static) is static
    with pytest.raises(TypeError, match="balancer must be"):
        resolve_balancer(3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown balancer 'nope'.*valid names.*'pcgrad'.*'upgrad'"):
        resolve_balancer("nope")


def test_needs_categories():
    losses = {"static", "uw", "dwa", "rlw", "gls", "imtll", "famo", "stch"}
    gradients = {"graddrop", "dbmtl"}
    for name, cls in BALANCERS.items():
        expected = "losses" if name in losses else "gradients" if name in gradients else "gramian"
        assert cls.needs == expected, name
    assert BALANCERS["famo"].needs_losses_after_step and not Balancer.needs_losses_after_step
    assert BALANCERS["dbmtl"].log_losses and not BALANCERS["graddrop"].log_losses


@pytest.mark.parametrize("cls", [CAGrad])
def test_solver_methods_without_cvxpy_say_how_to_install(cls, monkeypatch):
    import lightning_mtl.balancers._utils as utils

    real = utils.find_spec
    monkeypatch.setattr(utils, "find_spec", lambda name: None if name == "cvxpy" else real(name))
    with pytest.raises(ImportError, match=r"lightning-mtl\[solvers\]") as error:
        cls()
    assert "cvxpy" in str(error.value) and cls.__name__ in str(error.value)
    with pytest.raises(ImportError, match=r"lightning-mtl\[solvers\]"):
        resolve_balancer(cls.__name__.lower())

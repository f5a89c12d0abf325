import pytest

from lightning_mtl.balancers import BALANCERS, CAGrad, Balancer, Static, resolve_balancer

ALL_NAMES = [
    "static", "uw", "dwa", "rlw", "gls", "imtll", "famo", "stch",
    "mgda", "pcgrad", "cagrad", "graddrop", "gradvac", "imtlg", "nashmtl", "alignedmtl", "upgrad", "dualproj",
    "config", "gradnorm", "dbmtl",
    "fairgrad", "sdmgrad", "moco", "excessmtl",
    "autolambda",
]  # fmt: skip
NEEDS_SOLVERS: set[str] = set()


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
    losses = {"static", "uw", "dwa", "rlw", "gls", "imtll", "famo", "stch", "autolambda"}
    gradients = {"graddrop", "dbmtl", "moco", "excessmtl"}
    for name, cls in BALANCERS.items():
        expected = "losses" if name in losses else "gradients" if name in gradients else "gramian"
        assert cls.needs == expected, name
    assert BALANCERS["famo"].needs_losses_after_step and not Balancer.needs_losses_after_step
    assert BALANCERS["dbmtl"].log_losses and not BALANCERS["graddrop"].log_losses


def test_cagrad_needs_no_cvxpy(monkeypatch):
    """CAGrad solves its dual natively (``lightning_mtl.balancers._qp``): no optional solver is needed."""
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("cvxpy", "clarabel") else real(name, *a))
    for name in ("cvxpy", "clarabel"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of either now fails
    assert isinstance(CAGrad(), CAGrad) and isinstance(resolve_balancer("cagrad"), CAGrad)

import pytest

from lightning_mtl.balancers import (
    DBMTL, DWA, FAMO, MGDA, RLW, STCH, AlignedMTL, CAGrad, GradDrop, GradNorm, GradVac, NashMTL, PCGrad,
)  # fmt: skip

BAD_ARGUMENTS = [
    (DWA, {"temperature": 0.0}, "temperature"),
    (DWA, {"temperature": -1.0}, "temperature"),
    (RLW, {"seed": -1}, "seed"),
    (RLW, {"seed": 1.5}, "seed"),
    (PCGrad, {"seed": True}, "seed"),
    (FAMO, {"lr": 0.0}, "lr"),
    (FAMO, {"weight_decay": -1e-3}, "weight_decay"),
    (STCH, {"mu": 0.0}, "mu"),
    (MGDA, {"epsilon": 0.0}, "epsilon"),
    (MGDA, {"max_iters": 0}, "max_iters"),
    (AlignedMTL, {"scale_mode": "max"}, "scale_mode"),
    (GradDrop, {"leak": 1.5}, "leak"),
    (GradDrop, {"seed": -3}, "seed"),
    (GradVac, {"beta": 1.1}, "beta"),
    (GradVac, {"eps": -1.0}, "eps"),
    (GradNorm, {"alpha": -0.5}, "alpha"),
    (GradNorm, {"lr": 0.0}, "lr"),
    (DBMTL, {"beta": 1.0}, "beta"),
    (DBMTL, {"beta": -0.1}, "beta"),
    (CAGrad, {"c": -0.1}, "c"),
    (NashMTL, {"max_norm": -1.0}, "max_norm"),
    (NashMTL, {"update_weights_every": 0}, "update_weights_every"),
    (NashMTL, {"optim_niter": 0}, "optim_niter"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name"), BAD_ARGUMENTS)
def test_bad_argument_raises_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(**kwargs)


def test_per_task_arguments_are_checked_against_the_tasks():
    with pytest.raises(ValueError, match="reference has 1 values for 2 tasks"):
        STCH(reference=[0.0]).setup(["a", "b"])
    with pytest.raises(ValueError, match="min_losses has 3 values for 2 tasks"):
        FAMO(min_losses=[0.0, 0.0, 0.0]).setup(["a", "b"])


def test_losses_before_setup_say_what_to_do():
    with pytest.raises(RuntimeError, match="call setup"):
        DWA()(pytest.importorskip("torch").ones(2), pytest.importorskip("torch").ones(2, dtype=bool))

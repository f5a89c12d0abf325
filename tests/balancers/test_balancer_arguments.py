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


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [(FAMO, {"lr": float("inf")}, "lr"), (GradNorm, {"lr": float("inf")}, "lr"), (STCH, {"mu": float("inf")}, "mu"),
     (DWA, {"temperature": float("inf")}, "temperature"), (MGDA, {"epsilon": float("inf")}, "epsilon")],
)  # fmt: skip
def test_infinity_is_rejected_where_the_range_is_unbounded(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number in [([]0\.0, inf\), got inf$"):
        cls(**kwargs)


def test_numpy_scalars_are_accepted_as_plain_numbers():
    np = pytest.importorskip("numpy")
    dwa = DWA(temperature=np.float32(2.0))
    assert dwa.temperature == 2.0 and type(dwa.temperature) is float
    assert GradDrop(leak=np.float64(0.5)).leak == 0.5
    rlw = RLW(seed=np.int64(3))
    assert rlw.seed == 3 and type(rlw.seed) is int
    with pytest.raises(ValueError, match=r"^leak must be a number in \[0\.0, 1\.0\], got np\.True_$"):
        GradDrop(leak=np.bool_(True))


@pytest.mark.parametrize("seed", [2**64, 2**70])
def test_a_seed_beyond_64_bits_is_rejected_naming_the_range(seed):
    with pytest.raises(ValueError, match=rf"^seed must be an int in \[0, 2\*\*64\), got {seed}$"):
        RLW(seed=seed)
    assert RLW(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed torch.Generator takes

"""Balancers: how the tasks of a step are combined into one update.

Loss level (``needs = "losses"``): :class:`Static`, :class:`UW`, :class:`DWA`, :class:`RLW`,
:class:`GLS`, :class:`IMTLL`, :class:`FAMO`, :class:`STCH`; learning from held-out batches:
:class:`AutoLambda`.

Gradient level, Gramian weightings (``needs = "gramian"``): :class:`MGDA`, :class:`PCGrad`,
:class:`CAGrad`, :class:`GradVac`, :class:`IMTLG`, :class:`NashMTL`, :class:`AlignedMTL`,
:class:`UPGrad`, :class:`DualProj`, :class:`ConFIG`, :class:`GradNorm`, :class:`FairGrad`, :class:`SDMGrad`.

Gradient level, needing the gradients (``needs = "gradients"``): :class:`GradDrop`, :class:`DBMTL`,
:class:`MoCo`, :class:`ExcessMTL`.

See :class:`Balancer` for the contract with ``MultiTaskModule``.
"""

from __future__ import annotations

from lightning_mtl.balancers.alignedmtl import AlignedMTL
from lightning_mtl.balancers.autolambda import AutoLambda
from lightning_mtl.balancers.base import (
    Balancer,
    GradientBalancer,
    GramianBalancer,
    MaskedScalarizer,
    NonlinearScalarization,
)
from lightning_mtl.balancers.cagrad import CAGrad
from lightning_mtl.balancers.config import ConFIG
from lightning_mtl.balancers.dbmtl import DBMTL
from lightning_mtl.balancers.dualproj import DualProj
from lightning_mtl.balancers.dwa import DWA
from lightning_mtl.balancers.excessmtl import ExcessMTL
from lightning_mtl.balancers.fairgrad import FairGrad
from lightning_mtl.balancers.famo import FAMO
from lightning_mtl.balancers.gls import GLS
from lightning_mtl.balancers.graddrop import GradDrop
from lightning_mtl.balancers.gradnorm import GradNorm
from lightning_mtl.balancers.gradvac import GradVac
from lightning_mtl.balancers.imtlg import IMTLG
from lightning_mtl.balancers.imtll import IMTLL
from lightning_mtl.balancers.mgda import MGDA
from lightning_mtl.balancers.moco import MoCo
from lightning_mtl.balancers.nashmtl import NashMTL
from lightning_mtl.balancers.pcgrad import PCGrad
from lightning_mtl.balancers.rlw import RLW
from lightning_mtl.balancers.sdmgrad import SDMGrad
from lightning_mtl.balancers.static import Static
from lightning_mtl.balancers.stch import STCH
from lightning_mtl.balancers.upgrad import UPGrad
from lightning_mtl.balancers.uw import UW

_CLASSES: tuple[type[Balancer], ...] = (
    Static, UW, DWA, RLW, GLS, IMTLL, FAMO, STCH,
    MGDA, PCGrad, CAGrad, GradVac, IMTLG, NashMTL, AlignedMTL, UPGrad, DualProj, ConFIG, GradNorm,
    GradDrop, DBMTL,
    FairGrad, SDMGrad, MoCo, ExcessMTL,
    AutoLambda,
)  # fmt: skip

#: Balancers selectable by name (case-insensitive) in ``MultiTaskModule(balancer="...")``.
BALANCERS: dict[str, type[Balancer]] = {cls.__name__.lower(): cls for cls in _CLASSES}


#: Bases that hold what their methods share but no method of their own: not usable as a balancer.
ABSTRACT_BALANCERS: tuple[type[Balancer], ...] = (
    Balancer, NonlinearScalarization, GramianBalancer, GradientBalancer, MaskedScalarizer,
)  # fmt: skip


def check_not_abstract(cls: type) -> None:
    """Refuse one of :data:`ABSTRACT_BALANCERS` (it would fail in the first training step), naming the usable ones."""
    if cls in ABSTRACT_BALANCERS:
        raise TypeError(
            f"balancer {cls.__name__} is an abstract base of the balancers, not a method: choose one of "
            f"{', '.join(c.__name__ for c in _CLASSES)} (by name, case-insensitive, or class_path)."
        )


def resolve_balancer(balancer: Balancer | str | None) -> Balancer:
    """Return a balancer instance from an instance, a registered name (case-insensitive) or ``None`` (``Static``)."""
    if balancer is None:
        return Static()
    if isinstance(balancer, Balancer):
        check_not_abstract(type(balancer))
        return balancer
    if isinstance(balancer, str):
        cls = BALANCERS.get(balancer.lower())
        if cls is None and ("class_path" in balancer or balancer.lstrip().startswith("{")):
            # jsonargparse passes a class_path config that failed to validate on as a plain string
            raise ValueError(
                f"balancer {balancer!r} is a class_path config that did not validate: a misspelt class_path or an "
                "init_args option the class does not take. Put it in the YAML config (the parser then names the "
                f"bad option) or check the class's arguments; registered names: {sorted(BALANCERS)}"
            )
        if cls is None:
            raise ValueError(f"unknown balancer {balancer!r}; valid names: {sorted(BALANCERS)}")
        return cls()
    raise TypeError(f"balancer must be a Balancer, a name or None, got {type(balancer).__name__}")


__all__ = [
    "AlignedMTL",
    "AutoLambda",
    "ABSTRACT_BALANCERS",
    "check_not_abstract",
    "BALANCERS",
    "Balancer",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "ExcessMTL",
    "FAMO",
    "FairGrad",
    "GLS",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "GramianBalancer",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "RLW",
    "SDMGrad",
    "STCH",
    "Static",
    "UPGrad",
    "UW",
    "resolve_balancer",
]

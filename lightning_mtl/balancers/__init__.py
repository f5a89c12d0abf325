"""Balancers: how the task losses of a step are combined into the one loss to back-propagate."""

from __future__ import annotations

from lightning_mtl.balancers.base import Balancer
from lightning_mtl.balancers.static import Static

#: Balancers selectable by name (case-insensitive) in ``MultiTaskModule(balancer="...")``.
BALANCERS: dict[str, type[Balancer]] = {cls.__name__.lower(): cls for cls in (Static,)}


def resolve_balancer(balancer: Balancer | str | None) -> Balancer:
    """Return a balancer instance from an instance, a registered name (case-insensitive) or ``None`` (``Static``)."""
    if balancer is None:
        return Static()
    if isinstance(balancer, Balancer):
        return balancer
    if isinstance(balancer, str):
        cls = BALANCERS.get(balancer.lower())
        if cls is None:
            raise ValueError(f"unknown balancer {balancer!r}; valid names: {sorted(BALANCERS)}")
        return cls()
    raise TypeError(f"balancer must be a Balancer, a name or None, got {type(balancer).__name__}")


__all__ = ["BALANCERS", "Balancer", "Static", "resolve_balancer"]

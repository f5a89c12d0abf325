"""The ``lightning-mtl`` command: Lightning's ``LightningCLI`` around :class:`MultiTaskModule`.

The whole experiment is one YAML file: ``model`` (backbone, tasks with head/loss/metrics/weight,
balancer, optimizer), ``data`` (any ``LightningDataModule``, by ``class_path``) and ``trainer``.
Sub-commands are Lightning's: ``fit``, ``validate``, ``test``, ``predict``; any option can be
overridden on the command line, e.g. ``--trainer.max_epochs 3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_mtl.module import MultiTaskModule


def main(args: Optional[Sequence[str]] = None) -> LightningCLI:
    """Entry point of the ``lightning-mtl`` console script; ``args`` replaces ``sys.argv[1:]``."""
    return LightningCLI(
        MultiTaskModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":  # pragma: no cover
    main()

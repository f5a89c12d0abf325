"""The ``lightning-mtl`` command: Lightning's ``LightningCLI`` around :class:`MultiTaskModule`.

The whole experiment is one YAML file: ``model`` (backbone, tasks with head/loss/metrics/weight,
balancer, optimizer), ``data`` (any ``LightningDataModule``, by ``class_path``) and ``trainer``.
Sub-commands are Lightning's: ``fit``, ``validate``, ``test``, ``predict``; any option can be
overridden on the command line, e.g. ``--trainer.max_epochs 3``.

One option is added to ``fit``: ``--test_after_fit true`` evaluates the test split once training
ends, with the best checkpoint when a ``ModelCheckpoint`` monitors a metric, else the last weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_mtl.module import MultiTaskModule


class MultiTaskCLI(LightningCLI):
    """``LightningCLI`` for :class:`MultiTaskModule` with any ``LightningDataModule``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="fit only: run the test split after fit (best checkpoint)."
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)


def run(args: Optional[Sequence[str]] = None) -> MultiTaskCLI:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return it, trainer and model included."""
    return MultiTaskCLI(
        MultiTaskModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


def main() -> None:
    """Entry point of the ``lightning-mtl`` console script."""
    run()


if __name__ == "__main__":  # pragma: no cover
    main()

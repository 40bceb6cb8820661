"""``lightning-selmerge fit|validate|test|predict``: Lightning's CLI with this library registered.

Every option of ``Trainer``, the model, the data module, :class:`DataOrderEnsemble`,
:class:`SelectionMergeCallback` and :class:`PositionLossMonitor` is configurable from YAML or the
command line; short class names work (``class_path: DataOrderEnsemble``) because the classes are
imported here, and ``--print_config`` shows every option with its documentation::

    lightning-selmerge fit --config configs/demo.yaml
    lightning-selmerge fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# imported for their class names: `class_path: CausalLMModule`, `DataOrderEnsemble`, ...
import lightning_selmerge.ensemble
import lightning_selmerge.hf
import lightning_selmerge.imbalance  # noqa: F401

__all__ = ["SelmergeCLI", "run_lightning"]


class SelmergeCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule / LightningDataModule (subclass mode).

    The saved ``config.yaml`` next to the logs is overwritten by a rerun in the same directory
    (a rerun of a config is the common case, not a mistake).
    """


def run_lightning(argv: Sequence[str]) -> int:
    args = list(argv)
    SelmergeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # None when they are the command line's: LightningCLI warns when given both
        args=None if args == sys.argv[1:] else args,
    )
    return 0

"""``lightning-selmerge fit|validate|test|predict``: Lightning's CLI with this library registered.

Every option of ``Trainer``, the model, the data module, :class:`DataOrderEnsemble`,
:class:`SelectionMergeCallback` and :class:`PositionLossMonitor` is configurable from YAML or the
command line; short class names work (``class_path: DataOrderEnsemble``) because the classes are
imported here, and ``--print_config`` shows every option with its documentation::

    lightning-selmerge fit --config configs/demo.yaml
    lightning-selmerge fit --config configs/demo.yaml --print_config
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

# imported for their class names: `class_path: CausalLMModule`, `DataOrderEnsemble`, ...
import lightning_selmerge.ensemble
import lightning_selmerge.hf
import lightning_selmerge.imbalance  # noqa: F401
from lightning_selmerge.cli.quiet import quiet_lightning_tips

__all__ = ["SelmergeCLI", "run_lightning"]


class SelmergeCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule / LightningDataModule (subclass mode).

    The saved ``config.yaml`` next to the logs is overwritten by a rerun in the same directory
    (a rerun of a config is the common case, not a mistake).
    """


def run_lightning(argv: Sequence[str]) -> int:
    with warnings.catch_warnings(), quiet_lightning_tips():
        # argv is the command line less --debug: LightningCLI's "given both" warning is moot
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        SelmergeCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # a parse error raises (cli.errors prints it on one line), not usage + exit
            parser_kwargs={"exit_on_error": False},
            args=list(argv),
        )
    return 0

"""``lightning-selmerge fit|validate|test|predict``: Lightning's CLI with this library registered.

Every option of ``Trainer``, the model, the data module, :class:`DataOrderEnsemble`,
:class:`SelectionMergeCallback` and :class:`PositionLossMonitor` is configurable from YAML or the
command line; short class names work (``class_path: DataOrderEnsemble``) because the classes are
imported here, and ``--print_config`` shows every option with its documentation::

    lightning-selmerge fit --config configs/demo.yaml
    lightning-selmerge fit --config configs/demo.yaml --print_config

With ``--replica k --num_replicas K --snapshot_dir DIR`` (``--replica`` defaulting to
``$SLURM_ARRAY_TASK_ID``) ``fit`` trains replica k of the ensemble as its own fit, see
:mod:`.replica`::

    lightning-selmerge fit --config configs/demo.yaml --replica 3 --num_replicas 4 \
        --snapshot_dir snapshots
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# imported for their class names: `class_path: CausalLMModule`, `DataOrderEnsemble`, ...
import lightning_selmerge.ensemble
import lightning_selmerge.hf
import lightning_selmerge.imbalance  # noqa: F401

from .replica import ReplicaSettings, add_replica_arguments, prepare_replica_job, replica_trainer

__all__ = ["SelmergeCLI", "run_lightning"]


class SelmergeCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule / LightningDataModule (subclass mode).

    The saved ``config.yaml`` next to the logs is overwritten by a rerun in the same directory
    (a rerun of a config is the common case, not a mistake). ``--replica``, ``--num_replicas``
    and ``--snapshot_dir`` make ``fit`` a replica job (:mod:`.replica`).
    """

    replica_job: ReplicaSettings | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_replica_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:  # before the seed is set: seed_everything=True is refused
            self.replica_job = prepare_replica_job(subcommand, self.config[subcommand])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.replica_job is not None:
            trainer_init = self.config_init[self.subcommand].get("trainer", {})
            kwargs = {**kwargs, **replica_trainer(trainer_init, self.replica_job)}
        return super().instantiate_trainer(**kwargs)


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

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

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import Strategy, StrategyRegistry

# imported for their class names: `class_path: CausalLMModule`, `DataOrderEnsemble`, ...
import lightning_selmerge.ensemble
import lightning_selmerge.hf
import lightning_selmerge.imbalance  # noqa: F401
from lightning_selmerge.cli.errors import class_names, did_you_mean
from lightning_selmerge.cli.quiet import HeldLogs, quiet_lightning_tips
from lightning_selmerge.progress import default_progress_bar

from .replica import ReplicaSettings, add_replica_arguments, prepare_replica_job, replica_trainer

__all__ = ["SelmergeCLI", "run_lightning"]


class SelmergeCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule / LightningDataModule (subclass mode).

    The saved ``config.yaml`` next to the logs is overwritten by a rerun in the same directory
    (a rerun of a config is the common case, not a mistake). Unless a progress bar is configured
    (or ``enable_progress_bar`` is false), the Trainer gets one that shows counters as integers
    (:mod:`lightning_selmerge.progress`). ``--replica``, ``--num_replicas`` and
    ``--snapshot_dir``, options of ``fit`` only, make it a replica job (:mod:`.replica`).
    """

    replica_job: ReplicaSettings | None = None
    _seed_logs: HeldLogs | None = None

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        """The subcommand's parser with the replica-job flags, listed in ``fit --help`` only:
        only ``fit`` trains (another subcommand refuses a value, and takes a fit's saved
        config, whose values are null)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        add_replica_arguments(parser, shown=subcommand == "fit")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            _check_strategy_name(self.config[subcommand].get("trainer.strategy"))
            _check_ckpt_path(self.config[subcommand].get("ckpt_path"))
        if subcommand is not None:  # before the seed is set: seed_everything=True is refused
            self.replica_job = prepare_replica_job(subcommand, self.config[subcommand])
        if self.replica_job is not None:  # a job's first start has no last.ckpt to resume yet
            warnings.filterwarnings("ignore", r'.*ckpt_path="last"\) is set, but there is no last')
        if subcommand not in (None, "fit"):  # a checkpoint scored elsewhere: its dirpath moved
            warnings.filterwarnings("ignore", "The dirpath has changed from")

    def _set_seed(self) -> None:
        """Seed as Lightning does; its "Seed set to N" waits until the classes are built, so a
        refused argument (``num_replicas=1``) prints its one-line error alone."""
        self._seed_logs = HeldLogs("lightning.fabric.utilities.seed")
        with self._seed_logs:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._seed_logs is not None:
            self._seed_logs.release()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config.get("trainer") or {}
        if self.replica_job is not None:
            kwargs = {**kwargs, **replica_trainer(trainer, self.replica_job)}
        callbacks = kwargs.get("callbacks", trainer.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, default_progress_bar()]
        return super().instantiate_trainer(**kwargs)


def _check_strategy_name(strategy: Any) -> None:
    """``--trainer.strategy=NAME`` passes NAME to the Trainer as one of Lightning's strategy
    names (``ddp``, ``fsdp``, ...), even a class name: refuse another name before the Trainer
    does with a traceback, naming the option that takes a class."""
    if not isinstance(strategy, str):
        return
    names = ["auto", *StrategyRegistry.available_strategies()]
    if strategy.lower() in names:
        return
    classes = class_names(Strategy)
    short = strategy.rsplit(".", 1)[-1]
    if short in classes:
        raise ValueError(
            f"trainer.strategy: {strategy!r} is a class, and --trainer.strategy=NAME takes "
            "Lightning's strategy names (auto, ddp, fsdp, ...); give the class as "
            f"--trainer.strategy.class_path={strategy} (or class_path: in YAML)."
        )
    hint = did_you_mean(strategy, [*names, *classes])
    raise ValueError(
        f"trainer.strategy: no strategy named {strategy!r}{hint}; --trainer.strategy=NAME takes "
        "Lightning's names (auto, ddp, fsdp, deepspeed, ...), and a class goes in "
        "--trainer.strategy.class_path=CLASS."
    )


def _check_ckpt_path(ckpt_path: Any) -> None:
    """A ``--ckpt_path`` file that does not exist is named before anything is built (Lightning
    finds out after building the model, the data and the Trainer)."""
    if not isinstance(ckpt_path, str) or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    if ckpt_path.startswith("registry:") or "://" in ckpt_path or Path(ckpt_path).exists():
        return
    raise FileNotFoundError(
        f"ckpt_path: checkpoint {ckpt_path!r} does not exist (relative paths are read from "
        f"{Path.cwd()}); fix --ckpt_path, or leave it out to start a new fit."
    )


def run_lightning(argv: Sequence[str]) -> int:
    with warnings.catch_warnings(), quiet_lightning_tips():
        # argv is the command line less --debug: LightningCLI's "given both" warning is moot
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")
        # Lightning 2.6 on torch 2.13's pytree, at every fit: nothing a user can act on
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        SelmergeCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # a parse error raises (cli.errors prints it on one line), not usage + exit
            # usage reads "lightning-selmerge [options] fit", not "__main__.py" under python -m
            parser_kwargs={"exit_on_error": False, "prog": "lightning-selmerge"},
            args=list(argv),
        )
    return 0

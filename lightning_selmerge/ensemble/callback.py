"""``SelectionMergeCallback``: merge the ensemble's replicas each epoch and validate the merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_selmerge.ensemble.merge_export import (
    export_merge,
    pretrained_submodule,
    warn_later_exports,
)
from lightning_selmerge.ensemble.replica_losses import ReplicaLosses
from lightning_selmerge.ensemble.replica_validation import validate_current_weights
from lightning_selmerge.ensemble.strategy import DataOrderEnsemble
from lightning_selmerge.merging import (
    MergeError,
    MergeMethod,
    MergeRule,
    NonFinite,
    ParameterSelection,
)
from lightning_selmerge.merging.methods import build_method
from lightning_selmerge.merging.plan import MergePlan

__all__ = ["SelectionMergeCallback"]


class SelectionMergeCallback(Callback):
    """Merge the :class:`DataOrderEnsemble` replicas at the end of each epoch's training.

    At the last training batch of every ``every_n_epochs``-th epoch and of the last epoch
    (``max_epochs``, ``max_steps``) (after the last replica's step; at the end of fit as a
    fallback for early stopping at an epoch end) it merges the K replicas with the merge core
    into :attr:`merged_state`, using the weights at fit start as the base for ``resample``. A
    fit stopped inside an epoch (a ``should_stop`` set during training batches, a
    step-interval ``Timer`` / ``max_time``) leaves the later replicas short of that epoch: they
    are not merged; with a warning, the module keeps the last merge, or its weights at fit
    start if no epoch was completed.
    Floating-point tensors are merged; integer and bool buffers are copied from replica 0 (they
    must agree). Like Lightning's ``WeightAveraging``:

    * the merged weights are swapped into the module for validation and swapped out afterwards,
      so **the validation metrics logged under the module's own names are the merged model's**;
    * at the end of fit the module holds the merged weights;
    * in checkpoints ``state_dict`` is the merged model (``LightningModule.load_from_checkpoint``
      gives the merge), while the replicas' states sit under the strategy's key: K + 2 model
      copies (replicas, initial weights, merge) and K optimizer states, for an exact resume.
      ``ModelCheckpoint(save_weights_only=True)`` stores the merged model only (one copy, no
      resume).

    With ``validate_replicas`` every replica is also validated before the merged model (its
    pass framed by the module's ``on_validation_epoch_start``/``_end``, so epoch-level state
    stays per pass), and what ``validation_step`` and ``on_validation_epoch_end`` log is logged
    again as ``replica_{k}/<name>`` and ``replica_mean/<name>``: the merged-vs-single-replica
    gap as a curve (the paper's Fig. 4). Those hooks thus run K + 1 times per validation; on
    several replica groups each rank holds another replica during a pass, so they must not
    reduce across ranks (``all_gather``, a synced metric's ``compute``), or pass
    ``validate_replicas=False``.
    During training ``replica_{k}/train_loss`` (epoch mean of ``training_step``'s loss) and
    ``replica_{k}/train_loss_step`` (every ``log_every_n_steps`` steps: replica k's mean loss
    since the last log, for each replica that trained then) are logged, and the progress bar
    shows the active ``replica``. With a
    :class:`~lightning_selmerge.imbalance.PositionLossMonitor` in the callbacks, its probe
    evaluates every replica (binned by that replica's first-epoch positions; the strategy tells
    it) and the merged model, which this callback registers with the strategy
    (:meth:`DataOrderEnsemble.add_probe_target`, binned by replica 0's), so
    ``imbalance/merged/spearman`` sits beside ``imbalance/replica_{k}/spearman`` (the paper's
    Fig. 3), on one device or on several replica groups.

    Args:
        method: a merge method (``ParameterSelection(resample=1)``, ``TiesMerging(...)``; in a
            LightningCLI YAML a ``class_path`` with ``init_args``), or a registered name
            (``"selection"``, ``"average"``, ...; see
            :func:`~lightning_selmerge.merging.methods.method_names`). Methods that need the base
            use the weights at fit start.
        resample, weights, probabilities: shortcuts for the parameters of a method given by
            name (``method="average", weights=[...]``).
        seed: the merge's random seed.
        every_n_epochs: merge every this many epochs, and at the last epoch (``max_epochs``,
            ``max_steps``; at the end of fit after an early stop, unless it stopped inside an
            epoch). Between merges, validation uses the latest merge.
        rules: per-tensor method overrides, first match wins.
        sync_replicas: after each merge, reset every replica's weights to the merge (optimizer
            states are kept). Beyond the paper; off by default.
        validate_replicas: also validate each replica (K extra validation passes).
        save_dir: after each merge, save the merged model under ``save_dir/epoch_{e:03d}`` with
            ``save_pretrained`` (the module must hold a Hugging Face ``PreTrainedModel``; a
            ``tokenizer`` attribute is saved too). A rerun replaces the epochs it reaches; the
            fit warns at its end of later epochs an earlier, longer run left there.
        log_replica_loss: log ``replica_{k}/train_loss`` and ``replica_{k}/train_loss_step``.
        nonfinite: a replica holding NaN or Inf (it diverged) stops the fit with a
            :class:`~lightning_selmerge.merging.NonFiniteError` naming the replica and the tensor
            (``"error"``), or is left out of the merge with a warning (``"drop"``; weights or
            probabilities of the others are kept / renormalised; one device only).
        merge_on_device: on one GPU, merge there (the replicas' chunks streamed from host
            memory, copies overlapped with the merge) and keep :attr:`merged_state` there; the
            bits are the CPU merge's. ``False``: merge on the CPU and keep the merge in host
            memory (saves one model's worth of GPU memory between merges).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_selmerge.ensemble import DataOrderEnsemble
        >>> trainer = Trainer(strategy=DataOrderEnsemble(num_replicas=4),
        ...                   callbacks=[SelectionMergeCallback(resample=1)],
        ...                   accelerator="cpu", devices=1, logger=False)
    """

    def __init__(
        self,
        method: MergeMethod | str = "selection",
        resample: int | None = None,
        weights: Sequence[float] | None = None,
        probabilities: Sequence[float] | None = None,
        seed: int = 0,
        every_n_epochs: int = 1,
        rules: Sequence[MergeRule] = (),
        sync_replicas: bool = False,
        validate_replicas: bool = True,
        save_dir: str | None = None,
        log_replica_loss: bool = True,
        nonfinite: NonFinite = "error",
        merge_on_device: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(
                f"SelectionMergeCallback: every_n_epochs must be >= 1, got {every_n_epochs}."
            )
        self.method = _method(
            method, resample=resample, weights=weights, probabilities=probabilities
        )
        self.seed = int(seed)
        self.every_n_epochs = int(every_n_epochs)
        self.rules = tuple(rules)
        for rule in self.rules:
            try:
                rule.method.check_parameters()
            except MergeError as err:
                raise MergeError(f"SelectionMergeCallback: {rule.label}: {err}") from err
        self.sync_replicas = sync_replicas
        self.validate_replicas = validate_replicas
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.log_replica_loss = log_replica_loss
        if nonfinite not in ("error", "drop"):
            raise ValueError(
                f"SelectionMergeCallback: nonfinite={nonfinite!r}; use 'error' (stop at a "
                "replica holding NaN/Inf) or 'drop' (merge the others)."
            )
        self.nonfinite: NonFinite = nonfinite
        self.merge_on_device = bool(merge_on_device)
        self.merged_state: dict[str, torch.Tensor] | None = None
        self._merged_step = -1
        self._restored = False
        self._live_state: dict[str, torch.Tensor] | None = None
        self._full_merged: dict[str, torch.Tensor] | None = None
        self._replica_metrics: dict[int, dict[str, float]] = {}
        self._stopped_in: int | None = None  # epoch of the last batch, if not its last batch
        self._last_export = -1  # the epoch of the latest merge saved to save_dir
        self._losses = ReplicaLosses()
        self._end_due: int | None = None  # the epoch whose batches all ran, its end not yet
        self._resume_state: dict[str, Any] | None = None  # load_state_dict's, for on_train_start

    # -- merging --------------------------------------------------------------------------
    def merge(self, strategy: DataOrderEnsemble) -> dict[str, torch.Tensor]:
        """Merge the strategy's current replica states with this callback's method.

        On several ranks this is a collective and returns this rank's slice of the merge.
        """
        return strategy.merge_replicas(
            self.method, self.rules, self.seed, self.nonfinite, on_device=self.merge_on_device
        )

    def _merge_now(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = _ensemble(trainer)
        self.merged_state = self.merge(strategy)
        self._merged_step = trainer.global_step
        self._full_merged = None
        if self.sync_replicas:
            strategy.reset_replicas(self.merged_state)
        if self.save_dir is not None:
            full = self._full_merged_state(strategy)  # a collective when sharded
            if trainer.is_global_zero:
                export_merge(pl_module, full, self.save_dir / f"epoch_{trainer.current_epoch:03d}")
            self._last_export = trainer.current_epoch

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._forget_last_fit()
        strategy = _ensemble(trainer)
        strategy.weights_only_state = lambda: (
            None if self.merged_state is None else self._full_merged_state(strategy)
        )
        try:  # fail at start, not after the first epoch
            plan = MergePlan.create(self.method, self.rules, self.seed, strategy.num_replicas)
        except MergeError as err:
            raise MisconfigurationException(
                f"SelectionMergeCallback with DataOrderEnsemble(num_replicas="
                f"{strategy.num_replicas}): {err}"
            ) from err
        _note_adapter_selection(pl_module, plan)
        if self.save_dir is not None:
            pretrained_submodule(pl_module)  # fail at start, not after the first epoch
        # a PositionLossMonitor probes the merge beside the replicas (on every rank: its slices),
        # at the epochs that merged (an earlier epoch's merge would be logged as this one's)
        strategy.add_probe_target(
            "merged",
            lambda: self.merged_state if self._merged_step == trainer.global_step else None,
            replica=0,
        )

    def _forget_last_fit(self) -> None:
        """Drop what an earlier fit of this callback left (its merge, a checkpoint's state that
        a resume which trained nothing never used), before this fit restores its checkpoint:
        a fit validated (sanity check, epochs before its first merge) and ended with another
        fit's merge."""
        self.merged_state = None
        self._merged_step = -1
        self._restored = False
        self._resume_state = None
        self._full_merged = None
        self._last_export = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored and self.merged_state is not None:  # the checkpoint's whole merge
            # as this rank's slices of the module, now sharded: before the sanity check
            # validates it (on_validation_epoch_start loads it into the module)
            self.merged_state = _ensemble(trainer).local_slices(self.merged_state)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._restored:
            self.merged_state = None
            self._merged_step = -1
        self._restored = False
        self._full_merged = None
        self._stopped_in = None
        strategy = _ensemble(trainer)
        self._losses.start(trainer, strategy.num_replicas)
        self._end_due = None
        saved, self._resume_state = self._resume_state, None
        if saved is not None:
            self._resume_losses(trainer, strategy, saved)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        strategy = _ensemble(trainer)
        replica = strategy.replica_of(batch_idx)
        pl_module.log("replica", float(replica), prog_bar=True, logger=False, on_epoch=False)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.log_replica_loss and isinstance(loss, torch.Tensor):
            value = float(loss.detach())
            if pl_module.automatic_optimization:  # Lightning's closure loss is divided by it
                value *= trainer.accumulate_grad_batches
            self._losses.add(trainer, strategy, replica, value, extract_batch_size(batch))
        # Lightning logs an epoch's metrics at the step it logs its last batch's at
        self._losses.log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        last_batch = batch_idx == trainer.num_training_batches - 1
        self._stopped_in = None if last_batch else trainer.current_epoch
        self._end_due = trainer.current_epoch if last_batch else None
        if last_batch and (
            (trainer.current_epoch + 1) % self.every_n_epochs == 0 or _fit_ends_here(trainer)
        ):
            self._merge_now(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_due = None
        if self.log_replica_loss:
            self._losses.log_epoch(trainer, _ensemble(trainer))

    def _resume_losses(
        self, trainer: Trainer, strategy: DataOrderEnsemble, saved: dict[str, Any]
    ) -> None:
        """Go on with the checkpoint's loss sums, and log the epoch whose end the checkpoint
        came before, when Lightning resumes with the next epoch (a checkpoint at an epoch's
        last batch)."""
        self._losses.restore(strategy, saved)
        due = saved.get("epoch_end_due")
        if due is None:
            return
        self._losses.log_step = int(due["step"])
        if int(due["epoch"]) != trainer.current_epoch:  # its on_train_epoch_end will not run
            if self.log_replica_loss:
                self._losses.log_epoch(trainer, strategy)
        else:  # (a Lightning that runs the epoch's end on resume)
            self._end_due = int(due["epoch"])

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.merged_state is None and fitting and not trainer.sanity_checking:
            rank_zero_warn(
                f"SelectionMergeCallback: validating in epoch {trainer.current_epoch}, before "
                f"the first merge (every_n_epochs={self.every_n_epochs}): the metrics, and a "
                "checkpoint that monitors them, are of the replica the module holds now, not of "
                "a merge; validate when it merges (check_val_every_n_epoch=every_n_epochs)."
            )
        if self.merged_state is None or not fitting:
            return
        strategy = _ensemble(trainer)
        self._live_state = strategy.module_state()
        self._replica_metrics = {}
        if self.validate_replicas and not trainer.sanity_checking:
            local = {}
            for replica, state in strategy.local_replica_states().items():
                strategy.load_module_state(state)
                local[replica] = validate_current_weights(trainer, pl_module)
            self._replica_metrics = strategy.gather_replica_metrics(local)
        strategy.load_module_state(self.merged_state)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._replica_metrics:
            sync = _ensemble(trainer).is_distributed  # equal on every rank already
            replicas = sorted(self._replica_metrics)
            for name in self._replica_metrics[replicas[0]]:
                values = [self._replica_metrics[k][name] for k in replicas]
                # names from several validation loaders already end in /dataloader_idx_{i}
                for replica, value in zip(replicas, values):
                    pl_module.log(
                        f"replica_{replica}/{name}",
                        value,
                        sync_dist=sync,
                        add_dataloader_idx=False,
                    )
                mean = sum(values) / len(values)
                pl_module.log(
                    f"replica_mean/{name}", mean, sync_dist=sync, add_dataloader_idx=False
                )
            self._replica_metrics = {}
        if self._live_state is not None:
            _ensemble(trainer).load_module_state(self._live_state)
            self._live_state = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = _ensemble(trainer)
        if self._stopped_in is not None:  # inside an epoch: its later replicas missed part of it
            kept = (
                f"the module keeps the last merge (step {self._merged_step})"
                if self.merged_state is not None
                else "no epoch was completed, so the module is left with its weights at fit start"
            )
            rank_zero_warn(
                f"SelectionMergeCallback: training stopped inside epoch {self._stopped_in} "
                "(should_stop, a Timer, max_time, or max_steps under manual optimization) "
                "before every replica finished "
                f"it; merging would mix unequally trained replicas, so {kept}. The replicas "
                "stay available through trainer.strategy.replica_states(); stop at an epoch "
                "end (e.g. max_epochs, or a Timer with interval='epoch') to merge them."
            )
        elif self.merged_state is None or self._merged_step != trainer.global_step:
            self._merge_now(trainer, pl_module)  # fallback: early stop, every_n_epochs
        strategy.release_live()
        if self.merged_state is not None:
            strategy.load_module_state(self.merged_state)
        else:
            strategy.load_module_state(strategy.initial_state.module)
        if self.save_dir is not None and trainer.is_global_zero and self._last_export >= 0:
            warn_later_exports(self.save_dir, self._last_export)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        step = self._losses.log_step
        due = None if self._end_due is None else {"epoch": self._end_due, "step": step}
        return {
            "merged_step": self._merged_step,
            "has_merged": self.merged_state is not None,
            **self._losses.state_dict(),
            # saved at an epoch's last batch, before the epoch's end: log its losses on resume
            "epoch_end_due": due,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._merged_step = int(state_dict["merged_step"])
        self._resume_state = dict(state_dict)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.merged_state is not None:
            checkpoint["state_dict"] = self._full_merged_state(_ensemble(trainer))
        own = checkpoint.get("callbacks", {}).get(self.state_key)
        if own is not None:  # a full checkpoint of a fit
            self._losses.save(_ensemble(trainer), own)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        own = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if trainer.state.fn == TrainerFn.FITTING and own.get("has_merged"):
            self.merged_state = checkpoint["state_dict"]
            self._restored = True

    # -- helpers --------------------------------------------------------------------------
    def _full_merged_state(self, strategy: DataOrderEnsemble) -> dict[str, torch.Tensor]:
        """The whole merge on global rank 0, which exports and checkpoints it (gathered from the
        shard ranks once per merge when sharded); ``{}`` on the other ranks."""
        assert self.merged_state is not None
        if self._full_merged is None:
            self._full_merged = strategy.full_state(self.merged_state, rank=0)
        return self._full_merged


def _method(
    method: MergeMethod | str,
    **shortcuts: Any,
) -> MergeMethod:
    """The callback's method: an object as given, or a registered name with the shortcuts;
    parameters that are wrong whatever K is are refused here, at construction."""
    given = {key: value for key, value in shortcuts.items() if value is not None}
    try:
        if isinstance(method, str):
            return build_method(method, given)
        if not isinstance(method, MergeMethod):
            raise MergeError(
                f"method must be a MergeMethod or one of the registered names, got {method!r}"
            )
        if given:
            raise MergeError(
                f"{', '.join(sorted(given))} given beside the method object {method}: pass them "
                f"to the method itself (e.g. {type(method).__name__}(...))"
            )
        method.check_parameters()
        return method
    except MergeError as err:
        raise MergeError(f"SelectionMergeCallback: {err}") from err


def _ensemble(trainer: Trainer) -> DataOrderEnsemble:
    strategy = trainer.strategy
    if not isinstance(strategy, DataOrderEnsemble):
        raise MisconfigurationException(
            "SelectionMergeCallback needs Trainer(strategy=DataOrderEnsemble(num_replicas=K)), "
            f"got {type(strategy).__name__}."
        )
    return strategy


def _fit_ends_here(trainer: Trainer) -> bool:
    """Whether the fit ends at this epoch's end by ``max_epochs`` or ``max_steps``: its merge
    is made at the last batch like every merge, so it is validated and probed in the epoch."""
    epochs = trainer.max_epochs  # None or -1: unbounded
    last_epoch = epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs
    return last_epoch or 0 < trainer.max_steps <= trainer.global_step


def _note_adapter_selection(module: LightningModule, plan: MergePlan) -> None:
    """Say once, at fit start, that parameter selection of LoRA adapters (``lora_A``/``lora_B``
    elements drawn one by one) is not the paper's selection of the effective weights."""
    adapters = [
        name
        for name, parameter in module.named_parameters()
        if parameter.requires_grad and (".lora_A." in name or ".lora_B." in name)
    ]
    if any(isinstance(plan.method_for(name), ParameterSelection) for name in adapters):
        rank_zero_info(
            "SelectionMergeCallback: selection draws the LoRA matrices' elements (A and B) one "
            "by one, so a merged adapter's B @ A mixes replicas inside every element, unlike "
            "the paper's selection of each effective weight; for the final model, merge the "
            "replicas folded (docs/lora.md)."
        )

"""Fault-injection runs for ``test_fault_injection.py``: SIGKILL a fit, resume it, save results.

    python fault_injection_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Imports torch and Lightning once (that takes ~8 s here, a whole fit ~1 s), then runs every fit in
a child forked from this still-idle process: the uninterrupted ``reference`` fit, and for each
other scenario a fit that kills itself with ``SIGKILL`` at the scenario's point, followed by a
new child that resumes from the killed run's ``last.ckpt``. The resumed child shares nothing
with the killed one but the files on disk. Results go to ``OUT_DIR/<scenario>/``:
``final.pt`` (the module's final state dict, the replica states, the global step),
``killed.json`` (what the dying child recorded just before the kill), ``after_kill.json`` (every
checkpoint file the kill left: its hash and global step, or why it does not load) and
``result.json`` (how each child ended). The fit: K=3 replicas of 8 batches (24 steps an epoch),
3 epochs, dropout and a step LR scheduler (so the RNG and scheduler states matter), selection
merge with resample and validation each epoch, a checkpoint after every training step plus
``last.ckpt``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ensemble_support import Net, fit
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_selmerge.merging.state_dict as state_dict_module
from lightning_selmerge.ensemble import DataOrderEnsemble, SelectionMergeCallback

K, EPOCHS, STEPS_PER_EPOCH = 3, 3, 24


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def die(out: Path, point: str, **details: Any) -> None:
    """Record where the kill happens, then SIGKILL this process (no cleanup, no flush)."""
    (out / "killed.json").write_text(json.dumps({"point": point, **details}))
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """Kills the fit in ``hook`` once ``when(trainer, batch_idx)`` holds."""

    def __init__(self, out: Path, hook: str, when: Callable[[Trainer, int], bool]) -> None:
        self.out, self.hook, self.when = out, hook, when

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer):
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx
        if self.hook == "optimizer_step" and self.when(trainer, batch_idx):
            die(self.out, "mid_replica", epoch=trainer.current_epoch, batch_idx=batch_idx)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.hook == "epoch_start" and self.when(trainer, 0):
            die(self.out, "epoch_boundary", epoch=trainer.current_epoch)


def inject(scenario: str, out: Path, ckpt_dir: Path) -> list[Callback]:
    """Arm the scenario's kill in this (child) process; returns callbacks to add to the fit."""
    if scenario == "mid_replica":  # replica 1 of epoch 1, between backward and optimizer step
        return [KillAt(out, "optimizer_step", lambda t, b: t.current_epoch == 1 and b == 12)]
    if scenario == "epoch_boundary":  # after epoch 0's merge, validation and checkpoint
        return [KillAt(out, "epoch_start", lambda t, b: t.current_epoch == 1)]
    if scenario == "replica_boundary":  # switching replica 1 -> 2 in epoch 1, half loaded
        real_load = DataOrderEnsemble._load

        def load(self: DataOrderEnsemble, state: Any) -> None:
            if self.lightning_module.trainer.current_epoch == 1 and self.active_replica == 1:
                self.lightning_module.load_state_dict(state.module)  # optimizer not loaded yet
                die(out, "replica_boundary", epoch=1, switching_to=2)
            real_load(self, state)

        DataOrderEnsemble._load = load  # type: ignore[method-assign]
        return []
    if scenario == "merge":  # epoch 1's merge, after 2 of the 4 tensors
        real_merge_tensor = state_dict_module.merge_tensor
        calls = {"n": 0}

        def merge_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 4 + 3:
                die(out, "merge", tensor=args[0])
            return real_merge_tensor(*args, **kwargs)

        state_dict_module.merge_tensor = merge_tensor
        return []
    if scenario == "checkpoint_write":  # half of last.ckpt written at step 30
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            # DataOrderEnsemble writes a checkpoint to a temporary file beside it, then renames
            name = Path(getattr(f, "name", str(f))).name
            step = json.loads((out / "progress.json").read_text())["global_step"]
            if name.startswith(".last.ckpt.tmp-") and step == 30:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                last = ckpt_dir / "last.ckpt"
                details = {
                    "previous_sha256": sha256(last),
                    "previous_step": torch.load(last, weights_only=False)["global_step"],
                    "written": len(data) // 2,
                    "size": len(data),
                    "temp": str(Path(f.name)),
                }
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die(out, "checkpoint_write", **details)
            real_save(obj, f, *args, **kwargs)

        torch.save = save
        return [Progress(out)]
    raise ValueError(f"unknown scenario {scenario!r}")


class Progress(Callback):
    """Writes the global step before the checkpoint callback saves (it runs after this one)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        (self.out / "progress.json").write_text(json.dumps({"global_step": trainer.global_step}))


def run_fit(out: Path, scenario: str, kill: bool, ckpt_path: str | None) -> None:
    """One fit (in a child process); saves the final states to ``out / "final.pt"``."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    ckpt_dir = out / "ckpts"
    callbacks: list[Callback] = [SelectionMergeCallback(resample=1, seed=7)]
    if kill:
        callbacks += inject(scenario, out, ckpt_dir)
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True))
    offload = (
        {"offload": "disk", "offload_dir": str(out / "offload")}
        if scenario == "replica_boundary"
        else {}
    )
    strategy = DataOrderEnsemble(num_replicas=K, seed=3, **offload)
    module = Net(scheduler=True, dropout=0.2)
    trainer, strategy = fit(
        module,
        K,
        EPOCHS,
        callbacks,
        val=True,
        strategy=strategy,
        ckpt_path=ckpt_path,
        enable_checkpointing=True,
    )
    final = {
        "module": module.state_dict(),
        "replicas": strategy.replica_states(),
        "global_step": trainer.global_step,
    }
    torch.save(final, out / "final.pt")


def snapshot(ckpt_dir: Path, target: Path) -> None:
    """What the kill left in the checkpoint directory (the strategy's ``.NAME.tmp-*`` files
    are unfinished writes, never read as checkpoints: left out here)."""
    files: dict[str, Any] = {}
    for path in sorted(ckpt_dir.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            step = torch.load(path, weights_only=False, map_location="cpu")["global_step"]
            files[path.name] = {"sha256": sha256(path), "global_step": step}
        except Exception as err:
            files[path.name] = {"error": f"{type(err).__name__}: {err}"}
    target.write_text(json.dumps(files))


def in_child(job: Callable[..., None], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``job(*args, **kwargs)`` in a forked child; how the child ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            job(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit_code": os.WEXITSTATUS(status)}


def run_scenario(out: Path, scenario: str) -> dict[str, Any]:
    """The reference fit, or a killed fit and its resumption; how each child ended."""
    out.mkdir(parents=True, exist_ok=True)
    if scenario == "reference":
        return {"run": in_child(run_fit, out, scenario, kill=False, ckpt_path=None)}
    killed = in_child(run_fit, out, scenario, kill=True, ckpt_path=None)
    in_child(snapshot, out / "ckpts", out / "after_kill.json")
    note = json.loads((out / "killed.json").read_text())
    if note.get("temp"):  # the kill left the checkpoint's temporary file behind
        temp = Path(note["temp"])
        note["temp_size_after_kill"] = temp.stat().st_size if temp.exists() else None
        temp.unlink(missing_ok=True)
        (out / "killed.json").write_text(json.dumps(note))
    last = out / "ckpts" / "last.ckpt"
    resumed = in_child(run_fit, out, scenario, kill=False, ckpt_path=str(last))
    return {"killed": killed, "resumed": resumed}


def main(argv: list[str]) -> int:
    root, scenarios = Path(argv[0]), argv[1:]
    for scenario in scenarios:
        result = run_scenario(root / scenario, scenario)
        (root / scenario / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

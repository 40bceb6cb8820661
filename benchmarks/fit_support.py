"""What the training benchmarks share: quiet Trainer arguments (also for the paper's settings),
and a tiny GPT-2 fit on random tokens run in a fresh child interpreter whose peak RSS the parent
reads (``ensemble_overhead.py``, ``scale_memory_training.py``; the parent never imports torch).

``spec`` keys: ``vocab``, ``seq_len``, ``hidden``, ``layers``, ``samples``, ``batch_size``,
``threads``, ``mode`` (and what the calling benchmark adds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def tiny_gpt2_fit_inputs(spec: dict[str, Any]) -> tuple[Any, Any]:
    """``(module, loader)``: a GPT-2 LightningModule built from ``spec`` (seed 0, AdamW 1e-3)
    and a shuffled loader of random token sequences. Sets torch's thread count."""
    import torch
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(spec["threads"])

    class LM(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = GPT2Config(
                vocab_size=spec["vocab"],
                n_positions=spec["seq_len"],
                n_embd=spec["hidden"],
                n_layer=spec["layers"],
                n_head=4,
            )
            self.model = GPT2LMHeadModel(config)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["samples"], spec["seq_len"]), generator=gen)
    loader = DataLoader(TensorDataset(ids), batch_size=spec["batch_size"], shuffle=True)
    return LM(), loader


def quiet_trainer_kwargs() -> dict[str, Any]:
    """Trainer arguments that keep a benchmark fit to the training itself."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }


def run_child(script: str, flag: str, spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Run ``script flag <spec as JSON>`` in a fresh interpreter: the JSON object it prints
    last, and its peak RSS in bytes (``ru_maxrss`` via ``os.wait4``)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, script, flag, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{spec['mode']} fit ({spec}) failed; run it alone to see why")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024

"""Tensors read from a memory-mapped checkpoint stay valid after their reader is closed: a
caller's views, and the ones an exception's traceback holds (a debugger or pytest reading them
must not crash the process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_selmerge.merging.safetensors_io import CheckpointReader


def test_a_view_outlives_its_closed_reader(tmp_path: Path) -> None:
    weight = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    save_file({"w": weight}, tmp_path / "m.safetensors")
    reader = CheckpointReader(tmp_path / "m.safetensors")
    view = reader.tensor("w")
    reader.close()
    assert torch.equal(view, weight)  # read after close: the map lives as long as the view
    with pytest.raises(ValueError, match="after the reader was closed"):
        reader.tensor("w")


def test_tensors_in_a_merge_errors_traceback_stay_readable(tmp_path: Path) -> None:
    for k in range(2):  # integer buffers that differ: the merge refuses them mid-way
        save_file(
            {"a": torch.randn(256), "steps": torch.tensor([k])}, tmp_path / f"r{k}.safetensors"
        )
    script = textwrap.dedent(
        f"""
        import sys, torch
        from lightning_selmerge.merging import MergeError, merge_checkpoints
        paths = [{str(tmp_path / "r0.safetensors")!r}, {str(tmp_path / "r1.safetensors")!r}]
        try:
            merge_checkpoints(paths, {str(tmp_path / "out")!r})
        except MergeError as err:
            tb, seen = err.__traceback__, 0
            while tb is not None:
                for value in list(tb.tb_frame.f_locals.values()):
                    items = value if isinstance(value, (list, tuple)) else [value]
                    for item in items:
                        if isinstance(item, torch.Tensor):
                            float(item.double().sum())  # touches every byte of the view
                            seen += 1
                tb = tb.tb_next
            print("read", seen)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) >= 2  # the replicas' 'steps' views, at least

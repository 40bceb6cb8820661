"""The files a merged model directory gets besides its weights: config, tokenizer, generation
config, and the subfolders of a Sentence-Transformers layout (``1_Pooling/``, ...).

They describe the weights, so they come from the first replica (its architecture is every
replica's: a fine-tuned head, added tokens), each file or module folder it lacks from the base;
weight files and weight indexes are not copied (the merge writes its own). The tokenizer's files
are one set: all from the first source that has any (a base's ``special_tokens_map.json`` beside
a replica's ``tokenizer.json`` could contradict its added tokens).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> replica, base, out = root / "r0", root / "base", root / "out"
    >>> for d in (replica, base, out):
    ...     d.mkdir()
    >>> _ = (replica / "config.json").write_text('{"num_labels": 3}')
    >>> _ = (replica / "model.safetensors").write_text("weights")
    >>> _ = (base / "config.json").write_text('{"num_labels": 2}')
    >>> _ = (base / "tokenizer.json").write_text("{}")
    >>> copy_side_files([replica, base], out)
    >>> sorted(p.name for p in out.iterdir()), (out / "config.json").read_text()
    (['config.json', 'tokenizer.json'], '{"num_labels": 3}')
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["WEIGHT_SUFFIXES", "copy_side_files", "side_file_sources"]

#: Files holding weights (or an index of them): never copied beside the merged weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = (*WEIGHT_SUFFIXES, ".index.json")
#: a Sentence-Transformers module folder (``1_Pooling``, ``2_Normalize``)
_MODULE_FOLDER = re.compile(r"^\d+_")
#: the files of a tokenizer, which one source gives as a set
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt"
    r"|.*\.model|.*\.tiktoken|chat_template\..*)$"
)


def side_file_sources(base: str | Path | None, first_replica: str | Path) -> list[Path]:
    """Where the output's other files come from, in order of precedence."""
    sources = [Path(first_replica)]
    if base is not None:
        sources.append(Path(base))
    return [source for source in sources if source.is_dir()]


def copy_side_files(sources: Sequence[Path], target: Path) -> None:
    """Copy each file of ``sources`` that ``target`` does not have yet (the first source wins),
    weights aside, and each Sentence-Transformers module folder (``1_Pooling/``: a number, an
    underscore); other folders (``checkpoint-500/``, ``runs/``) are not the model's. A module
    folder holding weights (``2_Dense/``) is not copied, with a warning: they are not merged.
    Tokenizer files come as a set from the first source holding any."""
    tokenizer_source = next(
        (s for s in sources for p in s.iterdir() if p.is_file() and _TOKENIZER_FILE.match(p.name)),
        None,
    )
    for source in sources:
        for item in sorted(source.iterdir()):
            destination = target / item.name
            if destination.exists() or item.name.startswith("."):
                continue
            if _TOKENIZER_FILE.match(item.name) and source != tokenizer_source:
                continue
            if item.is_file() and not item.name.endswith(_NOT_COPIED):
                shutil.copy2(item, destination)
            elif item.is_dir() and _MODULE_FOLDER.match(item.name):
                unmerged = [p for p in item.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES)]
                if unmerged:
                    warnings.warn(
                        f"{item} holds weights ({unmerged[0].name}) that this merge does not "
                        f"merge: the output has no {item.name}/; merge that folder's files as a "
                        "merge of their own and put the result there",
                        stacklevel=3,
                    )
                    continue
                shutil.copytree(item, destination)

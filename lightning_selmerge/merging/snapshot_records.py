"""What a job array writes for one epoch, ``SNAPSHOTS/epoch_{e:03d}/replica_{k:03d}``, and its
records: found, read and checked before a merge (:mod:`~.snapshots` merges them).

Layout (written by replica jobs, one per replica ``k`` of ``K``)::

    snapshot_dir/epoch_002/replica_000.safetensors     # a safetensors file, or
    snapshot_dir/epoch_002/replica_001/                # a save_pretrained directory
    snapshot_dir/epoch_002/replica_001/selmerge.json   # optional: K, replica, seed, epoch, ...
    snapshot_dir/epoch_002/selmerge.json               # optional, the same for the whole epoch

A record is a JSON object ``{"num_replicas": K, "replica": k, "seed": s, "epoch": e}``, optionally
with ``"draw_prefix"`` (see :func:`merge_epoch`), ``"fixed_batches"``, ``"initial_fingerprint"``
(of the weights every replica started from) and ``"recipe"`` (the training settings, any JSON);
a file snapshot holds its record in its safetensors metadata (key :data:`METADATA_KEY`). Every
record found must agree: the same ``num_replicas``, ``seed``, ``epoch``, ``draw_prefix``,
``fixed_batches``, initial weights and recipe, and a snapshot's ``replica`` equal to its own
index. A missing replica is refused (naming it) unless ``allow_missing``; the replicas present
are then merged as the only inputs (per-replica weights and probabilities follow their replicas,
see :meth:`~.methods.MergeMethod.subset`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import MergeError

__all__ = [
    "METADATA_KEY",
    "RECORD_NAME",
    "EpochSnapshots",
    "check_listed_order",
    "find_epoch_snapshots",
    "read_record",
    "recipe_differences",
    "replica_name",
]

#: The optional record a replica job writes beside its snapshot(s).
RECORD_NAME = "selmerge.json"
#: The safetensors metadata key of a file snapshot's record.
METADATA_KEY = "selmerge"
_REPLICA = re.compile(r"^replica_(\d{3,})(\.safetensors)?$")
_EPOCH = re.compile(r"^epoch_(\d{3,})$")
_RECORD_KEYS = (
    "num_replicas",
    "seed",
    "epoch",
    "draw_prefix",
    "fixed_batches",
    "initial_fingerprint",
)


def replica_name(replica: int) -> str:
    """The snapshot name of replica ``replica`` (add ``.safetensors`` for a file).

    >>> replica_name(7)
    'replica_007'
    """
    return f"replica_{replica:03d}"


@dataclass(frozen=True)
class EpochSnapshots:
    """The replicas found in an epoch directory and what their records say."""

    epoch_dir: Path
    paths: dict[int, Path]
    num_replicas: int
    missing: list[int]
    seed: int | None = None
    epoch: int | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the prefix the replicas' names carry inside the training module (e.g. ``"model."`` for a
    #: Hugging Face directory saved from ``self.model``), which keys the in-process merge's draws
    draw_prefix: str | None = None
    #: the fingerprint of the weights every replica started from (replica jobs record it)
    initial_fingerprint: str | None = None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_differences(first: Any, second: Any, limit: int = 4) -> str:
    """The settings two training recipes (records' ``"recipe"``) disagree on, as
    ``"key: a vs b"`` (the first ``limit`` of them; ``""`` when they agree).

    >>> recipe_differences({"lr": 1e-4, "betas": [0.9, 0.99]}, {"lr": 3e-4, "betas": [0.9, 0.99]})
    'lr: 0.0001 vs 0.0003'
    """
    a, b = _flatten(first), _flatten(second)

    def shown(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "(not set)"

    differ = [
        f"{key or 'recipe'}: {shown(a, key)} vs {shown(b, key)}"
        for key in sorted(a.keys() | b.keys())
        if key not in a or key not in b or a[key] != b[key]
    ]
    more = f" (and {len(differ) - limit} more)" if len(differ) > limit else ""
    return "; ".join(differ[:limit]) + more


def read_record(snapshot: str | Path) -> dict[str, Any] | None:
    """The record of a snapshot: a directory's ``selmerge.json``, a ``.safetensors`` file's
    metadata, or a ``.json`` record itself (``None`` when there is none).

    Raises:
        MergeError: a record that cannot be read or is not a JSON object.
    """
    snapshot = Path(snapshot)
    source = snapshot / RECORD_NAME if snapshot.is_dir() else snapshot
    if not source.is_file() or source.suffix not in (".json", ".safetensors"):
        return None
    try:
        if source.suffix == ".safetensors":
            with safe_open(str(source), framework="pt") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
            if text is None:
                return None
            record = json.loads(text)
        else:
            record = json.loads(source.read_text())
    except (OSError, ValueError, SafetensorError) as err:
        raise MergeError(f"{source} is not a readable JSON record: {err}") from err
    if not isinstance(record, dict):
        raise MergeError(f"{source} must hold a JSON object like {{num_replicas, replica, seed}}")
    return record


def check_listed_order(replicas: Sequence[str | Path]) -> None:
    """Refuse replica snapshots of one run (records agreeing on ``num_replicas``, ``seed`` and
    ``initial_fingerprint``) listed out of their recorded replica order, or one listed twice.

    The draws pick replicas by position in the list, so another order would silently give other
    bits than the run's epoch merge. Snapshots without records, or of different runs, are merged
    as listed.

    Raises:
        MergeError: naming the recorded order and the order to list them in.
    """
    try:
        records = [read_record(path) for path in replicas]
    except MergeError:  # an unreadable file: the merge's reader names what is wrong with it
        return
    if len(replicas) < 2 or any(r is None or "replica" not in r for r in records):
        return
    runs = {
        tuple(r.get(k) for k in ("num_replicas", "seed", "initial_fingerprint")) for r in records
    }
    if len(runs) > 1:
        return
    indices = [record["replica"] for record in records]
    seen: dict[Any, Path] = {}
    for index, path in zip(indices, map(Path, replicas)):
        if index in seen:
            raise MergeError(
                f"{seen[index]} and {path} are both replica {index} of one run "
                f"({replica_name(index)} twice): list each replica once"
            )
        seen[index] = path
    if indices != sorted(indices):
        ordered = " ".join(str(seen[k]) for k in sorted(indices))
        listed = ", ".join(f"replica {k}" for k in indices)
        raise MergeError(
            f"the replicas are listed as {listed} (their {RECORD_NAME} records), and the merge "
            "draws replicas by their place in the list: another order gives other bits than "
            f"the run's merge. list them in replica order: {ordered}"
        )


def find_epoch_snapshots(
    epoch_dir: str | Path, *, num_replicas: int | None = None, allow_missing: bool = False
) -> EpochSnapshots:
    """The replica snapshots of ``epoch_dir``, checked (see the module's docstring).

    ``num_replicas``: K when known (else what the records say, else the highest index + 1).

    Raises:
        MergeError: no snapshots, a replica both as a file and a directory, records that
            disagree (naming the replicas and values), missing replicas without
            ``allow_missing``, fewer than 2 replicas.
    """
    epoch_dir = Path(epoch_dir)
    if not epoch_dir.is_dir():
        raise MergeError(f"epoch directory {epoch_dir} does not exist")
    paths: dict[int, Path] = {}
    for entry in sorted(epoch_dir.iterdir()):
        match = _REPLICA.match(entry.name)
        if match is None or (match.group(2) is None) != entry.is_dir():
            continue
        index = int(match.group(1))
        if index in paths:
            raise MergeError(
                f"replica {index} is in {epoch_dir} twice ({paths[index].name} and "
                f"{entry.name}): keep one"
            )
        paths[index] = entry
    if not paths:
        raise MergeError(
            f"no replica snapshots in {epoch_dir}: expected replica_000.safetensors or "
            "replica_000/ (a save_pretrained directory), replica_001..., as replica jobs write them"
        )

    records: dict[str, dict[str, Any]] = {}
    epoch_record = read_record(epoch_dir / RECORD_NAME)
    if epoch_record is not None:
        records["the epoch record"] = epoch_record
    for index, path in paths.items():
        record = read_record(path)
        if record is not None:
            if "replica" in record and record["replica"] != index:
                raise MergeError(
                    f"{path} says replica {record['replica']} but sits in "
                    f"{path.name}: the snapshot was written to the wrong place"
                )
            records[path.name] = record
    if num_replicas is not None:
        records = {"--num_replicas": {"num_replicas": num_replicas}, **records}
    agreed: dict[str, Any] = {}
    for key in _RECORD_KEYS:
        values: dict[Any, list[str]] = {}
        for where, record in records.items():
            if record.get(key) is not None:
                values.setdefault(record[key], []).append(where)
        if len(values) > 1 and key == "num_replicas" and num_replicas is not None:
            others = [v for v in values if v != num_replicas]
            raise MergeError(
                f"--num_replicas {num_replicas}, but the records of {epoch_dir} say "
                f"num_replicas={others[0]}: give --num_replicas {others[0]}, or leave it out"
            )
        if len(values) > 1:
            listing = "; ".join(f"{key}={v} in {', '.join(w)}" for v, w in values.items())
            raise MergeError(
                f"the replicas of {epoch_dir} disagree on {key}: {listing}: they come from "
                "different runs; merge snapshots of one run only"
            )
        agreed[key] = next(iter(values), None)
    match = _EPOCH.match(epoch_dir.name)
    if match and agreed["epoch"] is not None and int(match.group(1)) != agreed["epoch"]:
        raise MergeError(
            f"the records in {epoch_dir} say epoch {agreed['epoch']}, the directory's name "
            f"epoch {int(match.group(1))}"
        )

    _check_recipes(epoch_dir, records)
    k = agreed["num_replicas"]
    count = k if k is not None else max(paths) + 1
    beyond = [i for i in paths if i >= count]
    if beyond:
        raise MergeError(
            f"{epoch_dir} holds {', '.join(replica_name(i) for i in beyond)} but K = {count}: "
            "snapshots of a run with more replicas are mixed in"
        )
    missing = [i for i in range(count) if i not in paths]
    if missing and not allow_missing:
        known = f"K = {count}" + ("" if k is not None else " (the highest index + 1)")
        raise MergeError(
            f"{epoch_dir} is missing {', '.join(replica_name(i) for i in missing)} of {known}: "
            f"wait for those replica jobs, or merge the {len(paths)} present with allow_missing "
            "(CLI: --allow_missing)"
        )
    if len(paths) < 2:
        raise MergeError(f"{epoch_dir} holds {len(paths)} replica snapshot(s): merging needs 2")
    return EpochSnapshots(
        epoch_dir,
        paths,
        count,
        missing,
        agreed["seed"],
        agreed["epoch"],
        records,
        agreed["draw_prefix"],
        agreed["initial_fingerprint"],
    )


def _check_recipes(epoch_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    """Refuse replicas whose jobs recorded different training recipes, naming the odd ones
    (those outside the recipe most replicas share, when most do)."""
    recipes = {where: r["recipe"] for where, r in records.items() if r.get("recipe") is not None}
    groups: dict[str, list[str]] = {}
    for where, recipe in recipes.items():
        groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(where)
    if len(groups) < 2:
        return
    common, *rest = sorted(groups.values(), key=len, reverse=True)
    odd = [where for group in rest for where in group]
    most = len(common) > len(odd)
    differences = recipe_differences(recipes[common[0]], recipes[odd[0]])
    present = [str(epoch_dir / name) for name in records if name.startswith("replica_")]
    prefix = next((r["draw_prefix"] for r in records.values() if r.get("draw_prefix")), "")
    advice = (
        f"rerun {', '.join(odd)} with the others' settings"
        if most
        else "rerun the replicas trained with the wrong ones"
    )
    raise MergeError(
        f"the replicas of {epoch_dir} were trained with different settings, {common[0]} vs "
        f"{odd[0]}: {differences}. The K jobs of a run share one config (only the replica "
        f"index differs): {advice}; to merge them anyway, merge them by path: "
        f"lightning-selmerge merge {' '.join(present)}"
        + (f" --draw_prefix {prefix}" if prefix else "")
        + " --base ... --out ..."
    )

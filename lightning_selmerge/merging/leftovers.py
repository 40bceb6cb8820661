"""Temporary names this library writes, and the recovery of those a killed process left behind.

Merge outputs, exports and checkpoints are first written under a temporary name that records
its owner, the writing process: ``.{NAME}.tmp-{id}-{host}-{pid}`` beside ``NAME``,
``.{NAME}.old-{same suffix}`` for the previous output while ``--overwrite`` swaps it, and
``selmerge-replicas-{host}-{pid}-*`` under ``$TMPDIR`` for ``offload="disk"`` without an
``offload_dir``. ``host`` is a short hash of the host name, ``pid`` the process id. (A replica
job's snapshot file, ``.replica_kkk.safetensors.tmp-{id}``, records no owner: the next start of
that replica's job removes it by name, see
:func:`~lightning_selmerge.ensemble.replica_snapshots.remove_stale_temporaries`.)

The next run in the same place cleans up after an owner that is certainly dead (same host, no
such process); it recovers an output the swap left half done (see :func:`recover_output`).
Leftovers whose owner cannot be known dead (another host, a live process, a name from an older
version) are never removed, only named with their sizes in a warning.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp()) / "merged"
>>> staging_path(out).name.startswith(".merged.tmp-")
True
>>> recover_output(out)  # nothing left behind: nothing to do
[]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "OFFLOAD_PREFIX",
    "backup_path",
    "clean_stale_files",
    "clean_stale_offload_dirs",
    "owner_tag",
    "recover_output",
    "staging_path",
]

HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
#: prefix of the temporary ``offload="disk"`` directories under ``$TMPDIR``
OFFLOAD_PREFIX = "selmerge-replicas-"
_SUFFIX = r"(?P<id>[0-9a-f]{8,12})-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)"
_SIDE = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>tmp|old)-{_SUFFIX}$")
_SIDE_ANY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8,12}(-.*)?$")
_OFFLOAD = re.compile(rf"^{OFFLOAD_PREFIX}(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-")


def owner_tag() -> str:
    """``{host}-{pid}`` of this process, as the temporary names record it."""
    return f"{HOST}-{os.getpid()}"


def staging_path(target: str | Path) -> Path:
    """A fresh temporary name beside ``target`` owned by this process: ``.NAME.tmp-...``."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-{owner_tag()}")


def backup_path(staging: Path, target: Path) -> Path:
    """Where ``target`` waits while ``staging`` replaces it: ``.NAME.old-`` + the staging
    name's suffix, so that a later run can tell which staging directory was complete."""
    match = _SIDE.match(staging.name)
    suffix = staging.name.split(".tmp-", 1)[1] if match else f"{uuid.uuid4().hex[:8]}-x"
    return target.with_name(f".{target.name}.old-{suffix}")


def _dead(host: str, pid: str) -> bool:
    """Whether the process that owned a name is certainly gone (only known on this host)."""
    if host != HOST or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += (Path(root) / name).lstat().st_size
    return total


def _describe(paths: Iterable[Path]) -> str:
    return ", ".join(f"{p} ({_size(p) / 2**20:.1f} MiB)" for p in paths)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _warn_unknown(unknown: list[Path], what: str) -> None:
    if unknown:
        warnings.warn(
            f"{what} left by another process, possibly still running (another host, a live "
            f"process, or an older version of lightning_selmerge): {_describe(unknown)}; delete "
            "them once no run writes there.",
            stacklevel=3,
        )


def recover_output(out: str | Path) -> list[str]:
    """Finish or undo what a killed process left of writing ``out`` (a directory, or a file
    written by an atomic save); returns what was done (also given in a warning).

    For a dead owner: ``.OUT.old-S`` with ``OUT`` missing means the process died between the
    two renames of ``--overwrite``: its staging ``.OUT.tmp-S`` was complete and becomes
    ``OUT`` (if it is gone, the old output is put back). ``.OUT.old-S`` beside ``OUT`` is the
    replaced output, removed; a ``.OUT.tmp-S`` alone is an unfinished write, removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    mine: dict[str, dict[str, Path]] = {}
    unknown: list[Path] = []
    for path in sorted(out.parent.iterdir()):
        match = _SIDE.match(path.name)
        if match and match["name"] == out.name:
            if _dead(match["host"], match["pid"]):
                suffix = path.name.split(f".{match['kind']}-", 1)[1]
                mine.setdefault(suffix, {})[match["kind"]] = path
            else:
                unknown.append(path)
        elif (loose := _SIDE_ANY.match(path.name)) and loose["name"] == out.name:
            unknown.append(path)
    done: list[str] = []
    for parts in mine.values():
        staging, backup = parts.get("tmp"), parts.get("old")
        try:
            if backup is not None and not out.exists():
                if staging is not None:
                    os.replace(staging, out)
                    done.append(f"finished replacing {out} with the complete output {staging}")
                    staging = None
                else:
                    os.replace(backup, out)
                    done.append(f"restored {out} from {backup}")
                    backup = None
            for path in (p for p in (staging, backup) if p is not None):
                size = _size(path)
                _remove(path)
                done.append(f"removed {path} ({size / 2**20:.1f} MiB)")
        except FileNotFoundError:  # another rank or run recovered it at the same moment
            continue
    if done:
        warnings.warn(
            f"recovered what a killed run left beside {out}: {'; '.join(done)}", stacklevel=2
        )
    _warn_unknown(unknown, f"temporary files of {out}")
    return done


_CLEANED: set[Path] = set()


def clean_stale_files(directory: str | Path, once: bool = False) -> list[Path]:
    """Remove the unfinished atomic-save files (``.NAME.tmp-...``, not directories) of dead
    processes in ``directory``; warn about those of unknown owners (another host's, or of no
    recorded owner); a live process of this host is simply at work. Returns what was removed.
    With ``once``, a directory already cleaned by this process is not looked at again."""
    directory = Path(directory)
    if once and directory.resolve() in _CLEANED:
        return []
    _CLEANED.add(directory.resolve())
    if not directory.is_dir():
        return []
    removed: list[Path] = []
    unknown: list[Path] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        match = _SIDE.match(path.name)
        if match and match["kind"] == "tmp":
            if _dead(match["host"], match["pid"]):
                removed.append(path)
            elif match["host"] != HOST:
                unknown.append(path)
        elif not match and (loose := _SIDE_ANY.match(path.name)) and loose["kind"] == "tmp":
            unknown.append(path)
    if removed:
        text = _describe(removed)
        for path in removed:
            path.unlink(missing_ok=True)
        warnings.warn(f"removed unfinished files of killed runs: {text}", stacklevel=2)
    _warn_unknown(unknown, "unfinished temporary files")
    return removed


def clean_stale_offload_dirs(tmpdir: str | Path) -> list[Path]:
    """Remove the ``offload="disk"`` temporary directories of dead processes under ``tmpdir``
    (each holds every replica's weights and optimizer state); warn about the others' that
    cannot be known dead. Returns what was removed."""
    tmpdir = Path(tmpdir)
    removed: list[Path] = []
    unknown: list[Path] = []
    for path in sorted(tmpdir.glob(f"{OFFLOAD_PREFIX}*")):
        match = _OFFLOAD.match(path.name)
        if match and _dead(match["host"], match["pid"]):
            removed.append(path)
        elif not match or match["host"] != HOST:
            unknown.append(path)  # a live process of this host is simply at work: no warning
    if removed:
        text = _describe(removed)
        for path in removed:
            _remove(path)
        warnings.warn(f"removed offload='disk' directories of killed runs: {text}", stacklevel=2)
    _warn_unknown(unknown, "offload='disk' directories (replica weights and optimizer states)")
    return removed

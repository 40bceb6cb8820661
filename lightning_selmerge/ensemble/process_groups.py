"""Free the ensemble's process groups at interpreter exit, while Python is still fully alive.

Why: a gloo worker thread (``pt_gloo_runloop``) drops its finished collective a moment after
the caller's ``wait()`` returns, and dropping it releases the tensors' Python objects, which
takes the GIL. If the main thread has meanwhile reached interpreter finalization, Python
(before 3.14) ends that worker with ``pthread_exit``, whose unwinding through the work's
``noexcept`` destructor calls ``std::terminate``: the process prints ``terminate called without
an active exception`` and exits 134 after a successful fit (pytorch/pytorch#117762; CPython
gh-87135; pytorch/pytorch#179291 tried an ``atexit`` ``destroy_process_group()`` in torch and
was abandoned). ``destroy_process_group()`` alone does not help here: torch's ``DeviceMesh``
keeps its groups in ``_pg_registry``, and the strategy's mesh (often in a garbage cycle with
the trainer) keeps them alive, so their worker threads are never joined.

:func:`release_at_exit` registers (once) an ``atexit`` hook that drops the meshes' references,
destroys the process groups and collects garbage cycles, so every ``ProcessGroupGloo``
destructor runs and joins its worker threads before finalization starts. A group something
else still references (e.g. FSDP2 state of a module kept in a global) is not freed by it.

>>> import torch.distributed as dist
>>> release_process_groups()  # nothing initialized: nothing to do
>>> dist.is_initialized()
False
"""

from __future__ import annotations

import atexit
import gc
import sys
import weakref
from typing import Any

import torch.distributed as dist

__all__ = ["release_at_exit", "release_process_groups"]

_MESHES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_HOOK_REGISTERED = False


def release_at_exit(mesh: Any) -> None:
    """Free ``mesh``'s process groups, and the default group, when the interpreter exits."""
    global _HOOK_REGISTERED
    _MESHES[id(mesh)] = mesh  # by identity: equal meshes of two fits hold different groups
    if not _HOOK_REGISTERED:
        atexit.register(release_process_groups)
        _HOOK_REGISTERED = True


def release_process_groups() -> None:
    """Drop the registered meshes' group references, destroy the process groups, collect.

    Skipped when the interpreter exits on an uncaught exception: a worker may then wait in a
    collective that a peer never joins, and joining it would hang until the group's timeout.
    """
    if getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None):
        return
    for mesh in list(_MESHES.values()):
        registry = getattr(mesh, "_pg_registry", None)  # torch's DeviceMesh: name -> group
        if isinstance(registry, dict):
            registry.clear()
    _MESHES.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # trainer <-> strategy <-> mesh cycles: free them now, not in finalization

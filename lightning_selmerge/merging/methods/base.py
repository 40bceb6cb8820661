"""What every merge method is: a declared set of parameters and a chunk kernel with a reference.

A method sees flat, equally long chunks of the K replicas (and of the base, when it needs one),
plus a :class:`ChunkContext` naming the tensor and the chunk's flat offset, which keys the random
draws. Each method is a frozen dataclass whose fields are its parameters (a field's ``help``
metadata documents it for the CLI and YAML rules), registered by name in
:mod:`~lightning_selmerge.merging.methods.registry`.

Every method has two implementations: :meth:`MergeMethod.merge_chunk`, the fast kernel the
drivers run, and :meth:`MergeMethod.reference`, a plain whole-tensor definition of the same
result that the property tests use as their oracle.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import MergeError
from ..keyed_random import KeyedRandom

__all__ = [
    "ChunkContext",
    "MergeMethod",
    "MethodParameter",
    "ReplicaAccumulator",
    "StreamTensor",
    "StreamingForm",
    "check_weights",
    "compute_dtype",
    "output_for",
    "require_base",
]


@dataclass(frozen=True)
class ChunkContext:
    """Where a chunk sits: the tensor's name and the chunk's first flat element offset.

    ``prepared``: per replica, what :meth:`MergeMethod.prepare_replica` computed from its whole
    tensor (``None`` for methods that need nothing beyond the chunk).
    """

    rng: KeyedRandom
    name: str
    start: int
    prepared: Any = None


@dataclass(frozen=True)
class MethodParameter:
    """One parameter of a method, as the CLI, the YAML rules and the docs show it.

    Example:
        >>> from lightning_selmerge.merging.methods import ParameterSelection
        >>> [p.name for p in ParameterSelection.parameters()]
        ['probabilities', 'resample']
    """

    name: str
    type: Any
    default: Any
    help: str


@dataclass(frozen=True)
class StreamTensor:
    """One tensor of a streaming merge (replicas fed one at a time), as a method's
    :class:`StreamingForm` sees it.

    ``draw_name`` keys the random draws (the tensor's name, maybe prefixed); ``base`` is the
    flat base tensor when the method :attr:`~MergeMethod.needs_base`; ``check_finite(piece,
    position, start)`` raises :class:`~..errors.NonFiniteError` naming the replica fed at
    ``position`` when ``piece`` (its elements ``start ..``) holds NaN/Inf.
    """

    name: str
    draw_name: str
    dtype: torch.dtype
    numel: int
    num_replicas: int
    rng: KeyedRandom
    base: torch.Tensor | None
    chunk_numel: int
    check_finite: Callable[[torch.Tensor, int, int], None]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(begin, end)`` of each chunk of ``chunk_numel`` elements, in order."""
        for begin in range(0, self.numel, self.chunk_numel):
            yield begin, min(begin + self.chunk_numel, self.numel)

    def context(self, begin: int) -> ChunkContext:
        """The :class:`ChunkContext` of the chunk starting at flat offset ``begin``."""
        return ChunkContext(self.rng, self.draw_name, begin)


class ReplicaAccumulator(Protocol):
    """One tensor's merge state, fed the replicas' flat tensors in order (positions 0 .. K-1)."""

    def add(self, position: int, flat: torch.Tensor) -> None: ...

    def finish(self) -> torch.Tensor:
        """The flat merged tensor; :class:`~..errors.AverageNotFinite` when it is not finite."""
        ...


class StreamingForm(Protocol):
    """A method's merge with the replicas read one at a time (see :meth:`MergeMethod.streaming`).

    ``start(tensor)`` gives an accumulator; after :meth:`ReplicaAccumulator.add` of every replica
    in order, its :meth:`~ReplicaAccumulator.finish` equals :meth:`MergeMethod.merge_chunk` over
    all K replicas at once, bit for bit, for every chunk size.
    """

    def state_bytes(self, dtype: torch.dtype, numel: int) -> int:
        """Bytes an accumulator of such a tensor holds (its output included)."""
        ...

    def start(self, tensor: StreamTensor) -> ReplicaAccumulator: ...


class MergeMethod(ABC):
    """How K replicas' values of one tensor become one value.

    Subclasses are frozen dataclasses whose fields are the parameters; :meth:`parameters` lists
    them with the ``help`` of each field's metadata.
    """

    #: The registry name (``"selection"``); set by :func:`~.registry.register_method`.
    name: ClassVar[str] = ""
    #: Whether :meth:`merge_chunk` needs the base (pre-trained) tensor.
    needs_base: bool = False
    #: Whether it computes with the base's values (task vectors), not only compares bits with
    #: them (resample): a NaN/Inf in the base then reaches the merge, and is refused.
    computes_with_base: ClassVar[bool] = False
    #: Whether a NaN or Inf in any replica always makes the merged chunk non-finite, so that a
    #: finite output proves finite inputs (the NaN/Inf check then reads the output only).
    propagates_nonfinite: bool = False
    #: Whether :meth:`prepare_replica` computes something from the whole tensor (e.g. TIES'
    #: per-tensor magnitude threshold); such a method cannot merge a rank's shard on its own.
    needs_whole_tensor: ClassVar[bool] = False
    #: Whether :meth:`merge_chunk` gives :meth:`reference`'s bits exactly (``False`` where the
    #: kernel fuses a multiply-add the reference rounds twice).
    exact_reference: ClassVar[bool] = True

    @classmethod
    def parameters(cls) -> tuple[MethodParameter, ...]:
        """The method's parameters (its dataclass fields), with their types, defaults and help."""
        hints = typing.get_type_hints(cls)
        return tuple(
            MethodParameter(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.init
        )

    def check_parameters(self) -> None:  # noqa: B027 - most methods have such checks
        """Raise :class:`MergeError` for parameters that are wrong whatever K is."""

    def validate(self, num_replicas: int) -> None:
        """Raise :class:`MergeError` when the method cannot merge ``num_replicas`` replicas."""
        if num_replicas < 2:
            raise MergeError(
                f"merging needs at least 2 replicas, got {num_replicas}: pass K >= 2 replica "
                "state dicts or checkpoints"
            )
        self.check_parameters()

    def prepare_replica(
        self,
        name: str,
        replica: torch.Tensor,
        base: torch.Tensor | None,
        chunk_numel: int,
    ) -> Any:
        """What the chunks need from replica ``k``'s whole (flat) tensor, read ``chunk_numel``
        elements at a time (e.g. TIES' magnitude threshold). The K results reach
        :meth:`merge_chunk` as the list ``ctx.prepared``. Only methods that
        :attr:`needs_whole_tensor` override it."""
        return None

    @abstractmethod
    def merge_chunk(
        self,
        ctx: ChunkContext,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merge flat, equally long chunks into ``out`` (a new tensor when ``None``) and return
        it, in the replicas' dtype. ``out`` must not overlap the inputs."""

    @abstractmethod
    def reference(
        self,
        name: str,
        replicas: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        rng: KeyedRandom,
    ) -> torch.Tensor:
        """The plain definition: the merge of whole tensors ``replicas`` (slow, obviously right).

        :meth:`merge_chunk` over any chunking gives the same result (the same bits when
        :attr:`exact_reference`).
        """

    def streaming(self) -> StreamingForm | None:
        """This method's merge with replicas read one at a time, or ``None`` (the default) when
        it has none and needs all K chunks at once (the streaming merge then refuses it)."""
        return None

    def subset(self, keep: Sequence[int]) -> MergeMethod:
        """This method for the replicas ``keep`` only (indices into the original K), used when
        replicas are dropped. Per-replica parameters follow their replicas; the default has none.
        """
        return self


def check_weights(values: Sequence[float] | None, num_replicas: int | None, what: str) -> None:
    """Finite numbers, one per replica when ``num_replicas`` is given (``None``: any count)."""
    if values is None:
        return
    if num_replicas is not None and len(values) != num_replicas:
        raise MergeError(
            f"{len(values)} {what} for {num_replicas} replicas: give exactly one per replica"
        )
    if any(not math.isfinite(v) for v in values):
        raise MergeError(f"{what} must be finite numbers, got {list(values)}")
    if not math.isfinite(sum(abs(v) for v in values)):
        raise MergeError(f"{what} {list(values)} overflow when summed: scale them down")
    if any(0 < abs(v) < sys.float_info.min for v in values):
        raise MergeError(
            f"{what} {list(values)}: each must be 0 or at least {sys.float_info.min:.3g} in "
            "magnitude (smaller ones lose their precision): scale them up"
        )


def compute_dtype(like: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32: where the arithmetic methods compute."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def output_for(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``like`` (same numel and dtype), or a new tensor like it."""
    if out is None:
        return torch.empty_like(like)
    if out.numel() != like.numel() or out.dtype != like.dtype:
        raise MergeError(
            f"out holds {out.numel()} {out.dtype} elements, the chunk {like.numel()} {like.dtype}"
        )
    return out.view(like.shape)


def require_base(name: str, method: MergeMethod, base: object | None, hint: str) -> None:
    """The one "needs the base" error: ``method`` needs the base weights of tensor ``name``."""
    if base is None:
        raise MergeError(
            f"tensor {name!r}: {method} needs the base (pre-trained) weights, but no base tensor "
            f"was given: pass {hint}"
        )

"""Parameter selection's streaming form: each replica copies the elements it wins.

The state is the output (initialised to the base when ``resample > 0``), every element's
``resample + 1`` candidate replicas (:func:`~..candidates.selection_candidates`, one byte each,
drawn before any replica is read) and, with resample, a byte per element: the position of the
earliest candidate known to have moved from the base (stored as ``resample + 1 - position``, 0
while none is known). Replica ``k`` writes the elements where it is candidate ``j`` below that
position and its value moved; without resample, where it is candidate 0. No arithmetic touches
the values: bit patterns are copied, so the result is ``merge_chunk``'s, bit for bit. A chunk
holding NaN/Inf raises :class:`~..errors.NonFiniteError` naming its replica as it is fed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..scratch import per_thread_buffer
from .base import StreamTensor
from .selection_candidates import selection_candidates
from .selection_kernel import bit_view

if TYPE_CHECKING:
    from .selection import ParameterSelection

__all__ = ["CandidateState", "SelectionStreaming"]


@dataclass(frozen=True)
class SelectionStreaming:
    """:class:`~.selection.ParameterSelection` with the replicas read one at a time.

    Example:
        >>> from lightning_selmerge.merging.methods import ParameterSelection
        >>> ParameterSelection(resample=1).streaming().state_bytes(torch.float32, 10)  # 4 + 3 each
        70
    """

    method: ParameterSelection

    def state_bytes(self, dtype: torch.dtype, numel: int) -> int:
        size, resample = dtype.itemsize, self.method.resample
        # the output, resample + 1 candidates, and with resample the earliest moved position
        return numel * (size + resample + 1 + (1 if resample else 0))

    def start(self, tensor: StreamTensor) -> CandidateState:
        return CandidateState(self.method, tensor)


class CandidateState:
    """Output + candidates + (with resample) the earliest moved candidate's position per element.

    Replica ``k`` wins an element when it is the earliest candidate that moved; each replica
    overwrites the elements where it is a candidate earlier than the best so far.
    """

    def __init__(self, method: ParameterSelection, tensor: StreamTensor) -> None:
        self.method, self.tensor = method, tensor
        self.count = method.resample + 1
        self.candidates = self.draw_candidates()
        if method.resample > 0:  # the plan checked that the base is given (needs_base)
            self.base = tensor.base.reshape(-1)  # read while replicas are fed, never written
            self.out = self.base.clone()
            # count - (position of the earliest candidate known to have moved); 0: none yet
            self.won = torch.zeros(tensor.numel, dtype=torch.uint8)
        else:
            self.out = torch.empty(tensor.numel, dtype=tensor.dtype)

    def draw_candidates(self) -> torch.Tensor:
        """Every element's ``[count, numel]`` candidate replicas (uint8), chunk by chunk."""
        tensor = self.tensor
        candidates = torch.empty((self.count, tensor.numel), dtype=torch.uint8)
        for begin, end in tensor.chunks():
            candidates[:, begin:end] = selection_candidates(
                self.method, tensor.context(begin), end - begin, tensor.num_replicas
            )
        return candidates

    def add(self, position: int, flat: torch.Tensor) -> None:
        count = self.count
        out_bits, bits = bit_view(self.out), bit_view(flat)
        for begin, end in self.tensor.chunks():
            self.tensor.check_finite(flat[begin:end], position, begin)
            target, piece = out_bits[begin:end], bits[begin:end]
            if count == 1:
                mine = torch.eq(self.candidates[0, begin:end], position)
                torch.where(mine, piece, target, out=target)
                continue
            # score: count - (earliest j with candidate j == this replica), 0 when it is none;
            # running maxima of 0/1 hits times (count - j): no masked_fill, which is slow on CPUs
            size = end - begin
            score = per_thread_buffer("stream_score", size, torch.uint8, None).zero_()
            hit = per_thread_buffer("stream_hit", size, torch.bool, None)
            term = per_thread_buffer("stream_term", size, torch.uint8, None)
            for j in range(count):
                torch.eq(self.candidates[j, begin:end], position, out=hit)
                torch.mul(hit.view(torch.uint8), count - j, out=term)
                torch.maximum(score, term, out=score)
            won = self.won[begin:end]
            wins = torch.ne(piece, bit_view(self.base)[begin:end])
            wins &= score > won
            torch.where(wins, piece, target, out=target)
            torch.where(wins, score, won, out=won)

    def finish(self) -> torch.Tensor:
        del self.candidates
        return self.out

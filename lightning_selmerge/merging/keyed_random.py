"""Counter-based random numbers keyed by (seed, tensor name, element offset).

Every element of every tensor has its own random values, computed from a stable hash of the seed
and the tensor's name and from the element's flat offset, never from a stateful generator. So a
merge gives the same bits whatever the chunk size, the order in which tensors are visited, the
device, or how a tensor is split across ranks and shards.

The mixer is SplitMix64 (Steele et al., 2014) evaluated with int64 tensor ops. One 64-bit hash
yields four 16-bit lanes or eight 8-bit lanes, one lane per element, so a draw that needs at most
8 bits (uniform selection among K <= 256 replicas) costs half the hashing of a 16-bit one.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from .scratch import per_thread_buffer

__all__ = ["UNIFORM_LEVELS", "KeyedRandom"]

#: Uniforms are integers in ``[0, UNIFORM_LEVELS)``.
UNIFORM_LEVELS = 1 << 16
_LITTLE_ENDIAN = sys.byteorder == "little"


def _as_int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)


def _logical_shift_xor_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    # torch's >> on int64 is arithmetic; mask the sign extension away to get a logical shift.
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch &= (1 << (64 - shift)) - 1
    x ^= scratch


def splitmix64_(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """SplitMix64's output function applied in place to an int64 tensor (wrapping arithmetic)."""
    if scratch is None:
        scratch = torch.empty_like(x)
    _logical_shift_xor_(x, 30, scratch)
    x *= _MUL1
    _logical_shift_xor_(x, 27, scratch)
    x *= _MUL2
    _logical_shift_xor_(x, 31, scratch)
    return x


#: Words hashed per pass and per thread: a block and its scratch (512 KiB together) stay in a
#: core's L2 cache through the hash's dozen passes, where a whole 1M-element chunk's words would
#: not. A pass is split across torch's intra-op threads (32K words each, ATen's grain size), so a
#: pass hashes this many words per thread: fewer would leave all but one thread idle.
_BLOCK_WORDS_PER_THREAD = 1 << 15


def _block_words(device: torch.device) -> int:
    """Words hashed per pass on ``device``; blocks only pay where caches are small (CPUs)."""
    if device.type != "cpu":
        return 1 << 62  # one pass: elsewhere (GPUs) blocks would only add launches
    return _BLOCK_WORDS_PER_THREAD * min(8, max(1, torch.get_num_threads()))


_PROGRESSIONS: dict[torch.device, torch.Tensor] = {}


def _golden_progression(count: int, device: torch.device) -> torch.Tensor:
    """``i * GOLDEN`` (wrapping) for ``i < count``, cached per device."""
    cached = _PROGRESSIONS.get(device)
    if cached is None or cached.numel() < count:
        cached = torch.arange(count, dtype=torch.int64, device=device).mul_(_GOLDEN)
        _PROGRESSIONS[device] = cached
    return cached[:count]


class KeyedRandom:
    """Uniform 16-bit integers for element ``offset`` of tensor ``name`` in stream ``stream``.

    Stream 0 is a selection's first draw; a resample's j-th re-draw uses stream j.

    Example:
        >>> rng = KeyedRandom(seed=0)
        >>> whole = rng.uniform16("layer.weight", stream=0, start=0, numel=10)
        >>> part = rng.uniform16("layer.weight", stream=0, start=3, numel=4)
        >>> bool((whole[3:7] == part).all())
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._keys: dict[tuple[str, int], int] = {}

    def key(self, name: str, stream: int) -> int:
        """A stable 64-bit key (blake2b, never Python's salted ``hash``) for one tensor stream."""
        cached = self._keys.get((name, stream))
        if cached is None:
            digest = hashlib.blake2b(
                f"{self.seed}\x00{name}\x00{stream}".encode(), digest_size=8
            ).digest()
            cached = self._keys[(name, stream)] = _as_int64(int.from_bytes(digest, "little"))
        return cached

    def _hash_words(self, name: str, stream: int, words: torch.Tensor) -> torch.Tensor:
        words.mul_(_GOLDEN).add_(self.key(name, stream))
        return splitmix64_(words)

    def _hash_range(
        self,
        name: str,
        stream: int,
        first_word: int,
        count: int,
        device: torch.device | str | None,
        keep: int = -1,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The hashes of words ``first_word .. first_word + count``, block by block.

        Word ``w`` hashes ``w * GOLDEN + key``: a cached ``i * GOLDEN`` plus one scalar per block,
        the same wrapping int64 sum as :meth:`_hash_words`. Each word is ANDed with the 64-bit
        mask ``keep`` while its block is still in cache. The words go into ``buffer`` when given.
        """
        device = torch.get_default_device() if device is None else torch.device(device)
        if buffer is None:
            hashed = torch.empty(count, dtype=torch.int64, device=device)
        else:
            if buffer.dtype != torch.int64 or buffer.numel() < count or buffer.device != device:
                raise ValueError(
                    f"buffer must be an int64 tensor of at least {count} words on {device}, got "
                    f"{buffer.dtype} of {buffer.numel()} on {buffer.device}"
                )
            hashed = buffer.view(-1)[:count]
        block = max(1, min(count, _block_words(device)))
        progression = _golden_progression(block, device)
        scratch = per_thread_buffer("hash", block, torch.int64, device)
        key = self.key(name, stream)
        word_mask = _as_int64(keep)
        for begin in range(0, count, block):
            end = min(begin + block, count)
            offset = _as_int64(key + (first_word + begin) * _GOLDEN)
            words = torch.add(progression[: end - begin], offset, out=hashed[begin:end])
            splitmix64_(words, scratch[: end - begin])
            if word_mask != -1:
                words &= word_mask
        return hashed

    def bits16(
        self,
        name: str,
        stream: int,
        start: int,
        numel: int,
        device: torch.device | str | None = None,
        *,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """16 random bits (an int16 bit pattern) for each element ``start .. start+numel``.

        Read as unsigned, element ``i`` of word ``i // 4`` holds bits ``16 * (i % 4)`` and up.
        ``buffer``: as in :meth:`masked_lanes`.
        """
        return self.masked_lanes(name, stream, start, numel, 0xFFFF, device, buffer=buffer)

    def masked_lanes(
        self,
        name: str,
        stream: int,
        start: int,
        numel: int,
        keep: int,
        device: torch.device | str | None = None,
        *,
        lane_bits: int = 16,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``lane_bits`` (16 or 8) random bits per element ANDed with the ``lane_bits``-bit mask
        ``keep``, at a fraction of a separate pass: an int16 or int8 bit pattern.

        Read as unsigned, element ``i`` of word ``i // (64 / lane_bits)`` holds bits
        ``lane_bits * (i % (64 / lane_bits))`` and up: a stream's 8-bit lanes are not its 16-bit
        ones. ``buffer``: an int64 tensor of at least ``words_needed(numel, lane_bits)`` words to
        hash into (the result is then a view of it), so that a caller merging chunk after chunk
        reuses one allocation instead of paying a fresh one's page faults per chunk.

        Example:
            >>> rng = KeyedRandom(seed=0)
            >>> masked = rng.masked_lanes("w", stream=0, start=5, numel=8, keep=0xFF00)
            >>> bool((masked == rng.bits16("w", stream=0, start=5, numel=8) & -256).all())
            True
            >>> whole = rng.masked_lanes("w", 0, start=0, numel=20, keep=0xFF, lane_bits=8)
            >>> part = rng.masked_lanes("w", 0, start=5, numel=8, keep=0xF0, lane_bits=8)
            >>> bool((part == whole[5:13] & -16).all())
            True
        """
        if lane_bits not in (8, 16):
            raise ValueError(f"lane_bits must be 8 or 16, got {lane_bits}")
        per_word = 64 // lane_bits
        first_word = start // per_word
        last_word = (start + numel + per_word - 1) // per_word
        lane_mask = keep & ((1 << lane_bits) - 1)
        word_mask = sum(lane_mask << (lane_bits * i) for i in range(per_word))
        hashed = self._hash_range(
            name, stream, first_word, last_word - first_word, device, word_mask, buffer
        )
        dtype = torch.int8 if lane_bits == 8 else torch.int16
        if _LITTLE_ENDIAN:
            lanes = hashed.view(dtype)
        else:  # pragma: no cover - no big-endian host runs torch today
            shifts = torch.arange(0, 64, lane_bits, device=hashed.device)
            lanes = (hashed.unsqueeze(1) >> shifts) & ((1 << lane_bits) - 1)
            lanes = lanes.to(dtype).reshape(-1)
        begin = start - first_word * per_word
        return lanes[begin : begin + numel]

    @staticmethod
    def words_needed(numel: int, lane_bits: int = 16) -> int:
        """The most hash words any ``numel`` consecutive elements span (a ``buffer``'s size)."""
        per_word = 64 // lane_bits
        return (numel + 2 * per_word - 2) // per_word

    def uniform16(
        self,
        name: str,
        stream: int,
        start: int,
        numel: int,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Uniforms (int32 in ``[0, 2**16)``) for elements ``start .. start+numel``."""
        return self.bits16(name, stream, start, numel, device).to(torch.int32) & 0xFFFF

    def uniform16_at(self, name: str, stream: int, offsets: torch.Tensor) -> torch.Tensor:
        """Uniforms for the elements at the given flat ``offsets`` (int64 tensor)."""
        return self.lanes_at(name, stream, offsets, lane_bits=16)

    def lanes_at(
        self, name: str, stream: int, offsets: torch.Tensor, lane_bits: int = 16
    ) -> torch.Tensor:
        """The ``lane_bits``-wide lanes (8 or 16) of the elements at flat ``offsets`` (int64), as
        unsigned values in an int32 tensor: what :meth:`masked_lanes` holds there, one at a time.

        Example:
            >>> rng = KeyedRandom(seed=0)
            >>> lanes = rng.masked_lanes("w", 0, start=0, numel=12, keep=0xFF, lane_bits=8)
            >>> at = rng.lanes_at("w", 0, torch.arange(12), lane_bits=8)
            >>> bool((at == lanes.to(torch.int32) & 0xFF).all())
            True
        """
        if lane_bits not in (8, 16):
            raise ValueError(f"lane_bits must be 8 or 16, got {lane_bits}")
        per_word = 64 // lane_bits
        hashed = self._hash_words(name, stream, offsets // per_word)
        lane_shift = (offsets % per_word).mul_(lane_bits)
        mask = (1 << lane_bits) - 1
        return hashed.bitwise_right_shift_(lane_shift).bitwise_and_(mask).to(torch.int32)

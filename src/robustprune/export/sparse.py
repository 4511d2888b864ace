"""Where a pruned tensor's kept weights are: the cheaper of two encodings of its mask, chosen per tensor.

- ``bitmask``: one bit per weight (``numpy.packbits``), ⌈n/8⌉ bytes whatever the density — cheapest above about
  1/8 density.
- ``delta``: the gaps between consecutive kept positions, minus one, as LEB128 varints (7 bits per byte, high bit
  set on all but a gap's last byte) — one byte per kept weight while gaps stay under 128, so about 1/100 of a
  bitmask's size at 100× compression, where a bitmask alone would cost 1/32 of the dense tensor.

The kept values themselves are stored in mask order (row-major), so a file stores ``count`` values plus one of
these byte strings. Both are written by hand: NumPy's ``packbits`` is the bitmask; no maintained library on the
registry encodes varint gaps of a NumPy array (protobuf's varints are per message field), and the vectorised
encoder/decoder below are about 40 lines.
"""
from __future__ import annotations

import numpy as np

ENCODINGS = ("bitmask", "delta")
_MAX_BYTES = 10  # a 64-bit gap needs at most 10 varint bytes


def encode(mask: np.ndarray) -> tuple[str, np.ndarray]:
    """(encoding name, uint8 bytes) of a flat boolean ``mask``, whichever is shorter."""
    mask = np.asarray(mask, dtype=bool).ravel()
    positions = np.flatnonzero(mask)
    gaps = np.diff(positions, prepend=-1) - 1
    if _varint_length(gaps) < (mask.size + 7) // 8:
        return "delta", _varint_encode(gaps)
    return "bitmask", np.packbits(mask)


def decode(encoding: str, data: np.ndarray, numel: int, count: int) -> np.ndarray:
    """The flat boolean mask of ``numel`` entries with ``count`` kept ones; ValueError on inconsistent data."""
    data = np.asarray(data, dtype=np.uint8).ravel()
    if not 0 <= count <= numel:
        raise ValueError(f"{count} kept weights of {numel}")
    if encoding == "bitmask":
        if len(data) != (numel + 7) // 8:
            raise ValueError(f"bitmask of {len(data)} bytes for {numel} weights")
        mask = np.unpackbits(data, count=numel).astype(bool)
        if int(mask.sum()) != count or np.any(np.unpackbits(data)[numel:]):
            raise ValueError("bitmask does not hold the stated number of weights")
        return mask
    if encoding != "delta":
        raise ValueError(f"unknown position encoding {encoding!r}")
    gaps = _varint_decode(data, count)
    if np.any(gaps >= np.uint64(numel)):  # compared as uint64: a huge gap must not wrap to a negative int64
        raise ValueError("a position gap is longer than the tensor")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1  # an overflow of the sum is refused just below
    if count and not (positions[0] >= 0 and positions[-1] < numel and np.all(np.diff(positions) > 0)):
        raise ValueError("positions run past the end of the tensor")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return mask


def _varint_length(values: np.ndarray) -> int:
    length = len(values)
    rest = values >> 7
    while rest.any():
        length += int(np.count_nonzero(rest))
        rest = rest >> 7
    return length


def _varint_encode(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.uint64)
    sizes = np.ones(len(values), dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        sizes += rest > 0
        rest = rest >> np.uint64(7)
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    for k in range(int(sizes.max(initial=0))):
        part = sizes > k
        byte = (values[part] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (sizes[part] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[part] + k] = (byte | more).astype(np.uint8)
    return out


def _varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    last = data < 0x80  # the final byte of each value
    if int(last.sum()) != count or (len(data) and not last[-1]):
        raise ValueError(f"position data does not hold {count} gaps")
    value_of_byte = np.concatenate([[0], np.cumsum(last)[:-1]]).astype(np.int64)
    first_byte = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = np.arange(len(data)) - first_byte[value_of_byte]
    if len(data) and shift.max() >= _MAX_BYTES:
        raise ValueError("a position gap is longer than 10 bytes")
    if np.any((data[shift == _MAX_BYTES - 1] & 0x7F) > 1):  # bits 64 and up would be shifted out silently
        raise ValueError("a position gap does not fit 64 bits")
    chunks = (data & 0x7F).astype(np.uint64) << (7 * shift).astype(np.uint64)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.add.reduceat(chunks, first_byte)  # uint64; a value's bytes are contiguous

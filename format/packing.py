"""Bit packing of b-bit unsigned codes into little-endian bit streams (docs/FORMAT.md, `rtn`).

Code j of a row occupies bits [j*b, j*b + b) of the row's bytes, bit i of the stream being bit
i mod 8 of byte i // 8. Eight codes of b bits fill exactly b bytes, so both directions work on
groups of eight codes through one 64-bit integer per group: no Python loop over elements, and
the same code path for every width (1, 2, 3, 4, 8).
"""
from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits!r} is not supported (supported: {SUPPORTED_BITS})")


def padded_length(n_codes: int, pad_to: int = 32) -> int:
    """Codes per row after zero padding to a multiple of `pad_to` (32 for `rtn`)."""
    return -(-n_codes // pad_to) * pad_to


def packed_row_bytes(n_codes: int, bits: int, pad_to: int = 32) -> int:
    """Bytes per packed row of `n_codes` codes of `bits` bits."""
    _check_bits(bits)
    return padded_length(n_codes, pad_to) * bits // 8


def pack_codes(codes: np.ndarray, bits: int, pad_to: int = 32) -> np.ndarray:
    """Pack codes (any integer array, values in [0, 2**bits)) along the last axis.

    Returns uint8 with the last axis replaced by `packed_row_bytes(K, bits, pad_to)`.
    """
    _check_bits(bits)
    if pad_to % 8:
        raise ValueError("pad_to must be a multiple of 8")
    codes = np.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    lead, k = codes.shape[:-1], codes.shape[-1]
    kp = padded_length(k, pad_to)
    flat = codes.reshape(-1, k).astype(np.uint64)
    if kp != k:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], kp - k), np.uint64)], axis=1)
    if bits == 8:
        return flat.astype(np.uint8).reshape(*lead, kp)
    groups = flat.reshape(flat.shape[0], kp // 8, 8)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(groups << shifts, axis=-1)  # [rows, kp/8] uint64
    # Little-endian bytes of each word; the low `bits` bytes hold the eight codes.
    as_bytes = words.astype("<u8").view(np.uint8).reshape(flat.shape[0], kp // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(as_bytes).reshape(*lead, kp * bits // 8)


def unpack_codes(packed: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 codes with the last axis of length `n_codes`."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if (nbytes * 8) % bits or (nbytes * 8 // bits) < n_codes or nbytes % bits:
        raise ValueError(f"{nbytes} bytes per row cannot hold {n_codes} codes of {bits} bits")
    kp = nbytes * 8 // bits
    flat = packed.reshape(-1, nbytes)
    if bits == 8:
        return np.ascontiguousarray(flat[:, :n_codes]).reshape(*lead, n_codes)
    rows = flat.shape[0]
    words8 = np.zeros((rows, kp // 8, 8), np.uint8)
    words8[:, :, :bits] = flat.reshape(rows, kp // 8, bits)
    words = words8.view("<u8").reshape(rows, kp // 8, 1).astype(np.uint64)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    codes = ((words >> shifts) & np.uint64((1 << bits) - 1)).astype(np.uint8)
    return np.ascontiguousarray(codes.reshape(rows, kp)[:, :n_codes]).reshape(*lead, n_codes)

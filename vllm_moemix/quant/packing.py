"""Bit packing along K (the input dimension), GPTQ-style, for 2/3/4/8 bits.

Layout: a weight of shape [N, K] is stored transposed as int32 words of shape
[K * bits / 32, N]. Along K the integers form one little-endian bit stream per
column: value k occupies bits [k*bits, (k+1)*bits) of the stream. For 2, 4 and 8
bits this is exactly GPTQ's layout (32/bits values per word); for 3 bits it is
GPTQ's 3-bit layout too (32 values in 3 words, two values straddling words).

Why along K: a matmul `x @ W^T` consumes W^T as [K, N], so unpacking gives the
operand directly, row-parallel TP shards K on whole words, and Marlin/Triton
GPTQ kernels expect this layout for 4/8 bits.
"""

from __future__ import annotations

import torch

from vllm_moemix.config.spec import PACK_CHUNK, SUPPORTED_BITS


def _stream_positions(bits: int) -> tuple[list[int], list[int], list[int]]:
    """For each of the 32 values of a chunk: (word, next word, shift) in the chunk's `bits` words."""
    word = [(j * bits) // 32 for j in range(PACK_CHUNK)]
    nxt = [min(w + 1, bits - 1) for w in word]
    shift = [(j * bits) % 32 for j in range(PACK_CHUNK)]
    return word, nxt, shift


_POSITIONS = {bits: _stream_positions(bits) for bits in SUPPORTED_BITS}


def _check(bits: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit values; supported: {SUPPORTED_BITS}")
    if k % PACK_CHUNK:
        raise ValueError(f"packed dimension {k} must be a multiple of {PACK_CHUNK}")


def packed_rows(k: int, bits: int) -> int:
    """Number of int32 rows that hold K values of `bits` bits."""
    _check(bits, k)
    return k * bits // 32


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers q of shape [K, N] (values in [0, 2**bits)) into int32 [K*bits/32, N]."""
    k, n = q.shape
    _check(bits, k)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits} bits")
    word, nxt, shift = _POSITIONS[bits]
    vals = q.to(torch.int64).reshape(k // PACK_CHUNK, PACK_CHUNK, n)
    shift_t = torch.tensor(shift, dtype=torch.int64).view(1, -1, 1)
    shifted = vals << shift_t  # up to 32 + 7 bits wide: low part -> word, high part -> next word
    low = shifted & 0xFFFFFFFF
    high = shifted >> 32
    words = torch.zeros(k // PACK_CHUNK, bits, n, dtype=torch.int64)
    # Bit ranges of different values never overlap, so adding is OR-ing.
    words.index_add_(1, torch.tensor(word), low)
    words.index_add_(1, torch.tensor(nxt), high)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # reinterpret as signed int32
    return words.reshape(k * bits // 32, n).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: int32 [..., K*bits/32, N] -> int32 values [..., K, N].

    Leading dims (e.g. experts) pass through. Pure torch ops, so it traces
    under torch.compile.
    """
    *lead, rows, n = packed.shape
    if bits not in _POSITIONS:
        raise ValueError(f"cannot unpack {bits}-bit values; supported: {SUPPORTED_BITS}")
    if (rows * 32) % bits or ((rows * 32) // bits) % PACK_CHUNK:
        raise ValueError(f"{rows} packed rows do not hold whole chunks of {bits}-bit values")
    k = rows * 32 // bits
    word, nxt, shift = _POSITIONS[bits]
    device = packed.device
    words = packed.reshape(*lead, k // PACK_CHUNK, bits, n).to(torch.int64) & 0xFFFFFFFF
    low = words.index_select(-2, torch.tensor(word, device=device))
    high = words.index_select(-2, torch.tensor(nxt, device=device))
    shift_t = torch.tensor(shift, dtype=torch.int64, device=device).view(-1, 1)
    vals = ((low | (high << 32)) >> shift_t) & ((1 << bits) - 1)
    return vals.reshape(*lead, k, n).to(torch.int32)

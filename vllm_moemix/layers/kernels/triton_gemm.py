"""Triton GEMM over (token, expert) pairs that dequantizes packed 2/3/4/8-bit tiles in registers.

Imported lazily (by triton_moe.py) because Triton decides at decoration time whether kernels are
compiled for a GPU or run by its interpreter (TRITON_INTERPRET=1: CPU tensors, how tests run here).

One launch handles one width group (one QuantSpec): `bits`, `group_size` and whether zero points exist
are compile-time constants, so a layer mixing 2/3/4/8-bit experts launches one specialised kernel per
width present. Pairs are sorted by expert and each expert's run is padded to BLOCK_M (vLLM's
moe_align_block_size idea, done with torch ops): every program multiplies BLOCK_M pairs of one expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32  # one packing chunk: groups are multiples of 32, so a K tile never straddles two groups


@triton.jit
def _packed_pairs_gemm(
    a_ptr,
    a_row_ptr,
    out_ptr,
    mult_ptr,
    sorted_pair_ptr,
    block_slot_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    N,
    K,
    stride_a,
    stride_out,
    stride_qe,
    stride_qk,
    stride_se,
    stride_sk,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_MULT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[pair, n] = (mult[pair] *) a[a_row[pair], :] @ W[slot][:, n], W dequantized tile by tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs >= 0
    rows = tl.load(a_row_ptr + pairs, mask=valid, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # Bit position of value k in its column's stream; a value may straddle two int32 words (3 bits).
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.int64)
    mask = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_base = q_ptr + slot * stride_qe
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_a + (k0 + offs_k)[None, :], mask=valid[:, None], other=0.0)
        row0 = (k0 * BITS) // 32 + word
        lo = tl.load(q_base + row0[:, None] * stride_qk + offs_n[None, :], mask=n_ok[None, :], other=0)
        hi_row = tl.minimum(row0 + 1, (K * BITS) // 32 - 1)
        hi = tl.load(q_base + hi_row[:, None] * stride_qk + offs_n[None, :], mask=n_ok[None, :], other=0)
        stream = (lo.to(tl.int64) & 0xFFFFFFFF) | ((hi.to(tl.int64) & 0xFFFFFFFF) << 32)
        q = ((stream >> shift[:, None]) & mask).to(tl.float32)
        g = k0 // GROUP
        scale = tl.load(s_ptr + slot * stride_se + g * stride_sk + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + slot * stride_se + g * stride_sk + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        w = (q - zero[None, :]) * scale[None, :]
        acc += tl.dot(a.to(tl.float32), w)
    if HAS_MULT:
        acc *= tl.load(mult_ptr + pairs, mask=valid, other=0.0)[:, None]
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    tl.store(out_ptr + safe_pairs[:, None] * stride_out + offs_n[None, :], acc, mask=valid[:, None] & n_ok[None, :])


def align_pairs(slots: torch.Tensor, num_slots: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by slot, each slot's run padded with -1 to a multiple of block_m.

    Returns (sorted_pairs [num_blocks * block_m], block_slot [num_blocks]); pairs with slot < 0 are dropped.
    """
    device = slots.device
    keep = torch.nonzero(slots >= 0).flatten()
    order = keep[torch.argsort(slots[keep], stable=True)]
    counts = torch.bincount(slots[keep], minlength=num_slots)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    first = torch.cumsum(counts, 0) - counts
    sorted_slots = slots[order]
    position = starts[sorted_slots] + torch.arange(order.numel(), device=device) - first[sorted_slots]
    sorted_pairs = torch.full((int(padded.sum()),), -1, dtype=torch.int64, device=device)
    sorted_pairs[position] = order
    block_slot = torch.repeat_interleave(torch.arange(num_slots, device=device), padded // block_m)
    return sorted_pairs, block_slot


def packed_pairs_gemm(
    a: torch.Tensor,
    a_row: torch.Tensor,
    slots: torch.Tensor,
    out: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    group_size: int,
    mult: torch.Tensor | None = None,
) -> None:
    """out[p] = (mult[p] *) a[a_row[p]] @ W[slots[p]] for every pair p with slots[p] >= 0 (others untouched).

    qweight [E, K*bits/32, N] int32, scales [E, K/g, N], qzeros [E, K/g, N] uint8 or empty (symmetric).
    """
    num_slots, _, n = qweight.shape
    k = a.shape[1]
    sorted_pairs, block_slot = align_pairs(slots, num_slots)
    if block_slot.numel() == 0:
        return
    has_zeros = qzeros.numel() > 0
    grid = (block_slot.numel(), triton.cdiv(n, BLOCK_N))
    _packed_pairs_gemm[grid](
        a,
        a_row,
        out,
        mult if mult is not None else out,
        sorted_pairs,
        block_slot,
        qweight,
        scales,
        qzeros if has_zeros else scales,
        n,
        k,
        a.stride(0),
        out.stride(0),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        BITS=bits,
        GROUP=group_size,
        HAS_ZEROS=has_zeros,
        HAS_MULT=mult is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )

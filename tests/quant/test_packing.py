"""Packing is exact for every width and shape, and matches GPTQ's bit order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moemix.config.spec import SUPPORTED_BITS
from vllm_moemix.quant.packing import pack, packed_rows, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), chunks=st.integers(1, 9), n=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_roundtrip_any_shape(bits, chunks, n, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (32 * chunks, n), generator=gen)
    packed = pack(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(32 * chunks, bits), n) == (chunks * bits, n)
    assert torch.equal(unpack(packed, bits), q.to(torch.int32))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extremes_and_leading_dims(bits):
    q = torch.tensor([[0], [(1 << bits) - 1]]).repeat(16, 3)  # alternating min/max exercises the sign bit
    packed = pack(q, bits)
    assert torch.equal(unpack(packed, bits), q.int())
    stacked = torch.stack([packed, pack(torch.flip(q, [0]), bits)])  # [E, rows, N]
    assert torch.equal(unpack(stacked, bits)[1], torch.flip(q, [0]).int())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_gptq_word_layout(bits):
    """GPTQ puts value j of a word at bit offset (j % (32/bits)) * bits."""
    per_word = 32 // bits
    q = torch.randint(0, 1 << bits, (32, 1))
    expected = sum(int(q[j, 0]) << (j * bits) for j in range(per_word))
    word = int(pack(q, bits)[0, 0]) & 0xFFFFFFFF
    assert word == expected


def test_three_bit_straddles_words_like_gptq():
    q = torch.zeros(32, 1, dtype=torch.int64)
    q[10] = 0b111  # bits 30..32: two in word 0, one in word 1
    packed = pack(q, 3)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(packed[1, 0]) == 0b1
    assert int(packed[2, 0]) == 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(48, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((32, 1), 4), 2)
    with pytest.raises(ValueError, match="cannot pack 5-bit"):
        pack(torch.zeros(32, 1, dtype=torch.int64), 5)

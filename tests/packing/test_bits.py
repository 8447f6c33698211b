import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.packing import pack, packed_length, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 70), seed=st.integers(0, 99)
)
def test_unpack_pack_is_identity(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize(
    ("bits", "n", "expected"), [(4, 576, 288), (3, 576, 216), (2, 64, 16), (8, 5, 5)]
)
def test_packed_sizes_are_tight(bits, n, expected):
    assert packed_length(n, bits) == expected


def test_nibble_layout_is_low_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_rejects_codes_that_do_not_fit():
    with pytest.raises(LowbitError, match="does not fit in 3 bits"):
        pack(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(LowbitError, match="expected"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)

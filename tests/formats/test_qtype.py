import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import int_type, nf4_codebook, qtype_for

# The NF4 values published with QLoRA / bitsandbytes (float32).
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_codebook_matches_published_values():
    assert nf4_codebook() == pytest.approx(NF4_PUBLISHED, abs=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_type_ranges(bits):
    qt = int_type(bits)
    assert qt.code_max == 2**bits - 1
    assert qt.mid == 2 ** (bits - 1)
    assert qt.sym_max == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_int_type_rejects_out_of_range(bits):
    with pytest.raises(LowbitError, match="1 to 8 bits"):
        int_type(bits)


def test_fixed_width_formats():
    assert qtype_for("fp8_e4m3", 8).float_max == 448.0
    assert qtype_for("fp8_e5m2", 8).torch_dtype == torch.float8_e5m2
    with pytest.raises(LowbitError, match="has 4 bits"):
        qtype_for("nf4", 3)
    with pytest.raises(LowbitError, match="unknown format"):
        qtype_for("int4x", 4)

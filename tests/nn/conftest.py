"""Fixtures of the nn tests."""

import pytest

from lowbit.kernels.build import native_ops
from lowbit.kernels.int8_conv import onednn_int8_available
from lowbit.nn import kernel_tensor


@pytest.fixture(params=["onednn", "avx2"])
def suffix(request, monkeypatch) -> str:
    """Which integer kernel the swap picks (the kind's suffix): oneDNN's where it is exact
    (VNNI), lowbit's AVX2 one where it is not (forced on a VNNI CPU by hiding oneDNN's)."""
    if request.param == "onednn":
        if not onednn_int8_available():
            pytest.skip("oneDNN's int8 convolution is exact with VNNI only")
        return ""
    if not native_ops():
        pytest.skip("lowbit's C++ kernels are not built on this machine")
    monkeypatch.setattr(kernel_tensor, "onednn_int8_available", lambda: False)
    # the tests' layers are small: each takes the kernel (the rule is tested on its own)
    monkeypatch.setattr(kernel_tensor, "PANEL_MIN_INPUTS", 1)
    return "-avx2"

"""LiteRT's forms of lowbit's layers: which are exact, and what --requantize makes of others."""

from types import SimpleNamespace

import torch

from lowbit.export.litert_codes import requantized


def test_requantize_float_keeps_every_inexact_layer_in_float():
    """An int4 symmetric block layer (whose LiteRT form rounds its scales to bfloat16) stays
    float32 when float is asked, and keeps its codes for int8 (a lossless choice there)."""
    spec = SimpleNamespace(qtype=SimpleNamespace(kind="int", bits=4), symmetric=True,
                           granularity="group", group_size=32, lorc_rank=0)  # fmt: skip
    codes = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    mod = SimpleNamespace(spec=spec, out_features=4, scale=torch.full((4, 2), 0.01),
                          int8_codes=lambda: codes)  # fmt: skip
    weight = codes.float() * 0.01
    assert requantized(mod, weight, "float") is None
    kept = requantized(mod, weight, "int8")
    assert kept.bits == 4 and torch.equal(torch.from_numpy(kept.codes), codes)

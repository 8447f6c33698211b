"""Quantized attention inputs through a transformers model's own forward."""

import pytest
import torch
import torch.nn.functional as F

from helpers import rel, tiny_llama
from lowbit.errors import LowbitError
from lowbit.formats.spec import AttentionSpec
from lowbit.nn.attention import ATTRIBUTE, attention_modules, install_attention
from lowbit.primitives.hadamard import hadamard


def test_rotated_heads_leave_attention_unchanged():
    """(qH)(kH)ᵀ = qkᵀ and (P·vH)Hᵀ = P·v: the rotation alone is exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(3))
    h = hadamard(16)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rotated = F.scaled_dot_product_attention(q @ h, k @ h, v @ h, is_causal=True) @ h.T
    assert rel(rotated, plain) < 1e-5


def test_fewer_bits_move_the_logits_more():
    model = tiny_llama(vocab=64)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits
        errors = []
        for spec in (AttentionSpec(kv_bits=8), AttentionSpec(kv_bits=4),
                     AttentionSpec(query_bits=4)):  # fmt: skip
            assert install_attention(model, spec) == len(model.model.layers)
            errors.append(float((model(ids).logits - ref).abs().mean()))
    assert 0 < errors[0] < errors[1] / 4  # 8-bit keys and values: far closer than 4-bit
    assert errors[2] > 0  # the queries are rounded too


def test_layers_without_a_spec_run_plain_sdpa():
    model = tiny_llama(vocab=64)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).logits
        install_attention(model, AttentionSpec(kv_bits=2))
        for m in attention_modules(model):
            delattr(m, ATTRIBUTE)
        assert rel(model(ids).logits, ref) < 1e-6


def test_bad_settings_are_clear_errors():
    with pytest.raises(LowbitError, match="2 to 8"):
        AttentionSpec(kv_bits=9)
    with pytest.raises(LowbitError, match="kv_bits and/or query_bits"):
        AttentionSpec(hadamard=True)
    with pytest.raises(LowbitError, match="does not divide"):
        install_attention(tiny_llama(vocab=64), AttentionSpec(kv_bits=4, group_size=7))
    with pytest.raises(LowbitError, match="transformers model"):
        install_attention(torch.nn.Linear(4, 4), AttentionSpec(kv_bits=4))

"""Quantized attention inputs through a transformers model's own forward."""

import pytest
import torch
import torch.nn.functional as F

from helpers import rel, tiny_family_model, tiny_llama
from lowbit.errors import LowbitError
from lowbit.formats.spec import AttentionSpec
from lowbit.nn.attention import (
    ATTRIBUTE,
    CENTER,
    attention_modules,
    calibrate_key_centers,
    has_key_centers,
    install_attention,
)
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
                     AttentionSpec(query_bits=4), AttentionSpec(kv_bits=16)):  # fmt: skip
            assert install_attention(model, spec) == len(model.model.layers)
            errors.append(float((model(ids).logits - ref).abs().mean()))
    assert 0 < errors[0] < errors[1] / 4  # 8-bit keys and values: far closer than 4-bit
    assert errors[2] > 0  # the queries are rounded too
    assert 0 < errors[3] < errors[0] / 8  # float16 keys and values: closer still


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
    with pytest.raises(LowbitError, match="or 16"):
        AttentionSpec(kv_bits=12)
    for other in ({"group_size": 32}, {"query_bits": 8}, {"hadamard": True}):
        with pytest.raises(LowbitError, match="kv_bits 16 stores float16"):
            AttentionSpec(kv_bits=16, **other)
    with pytest.raises(LowbitError, match="does not divide"):
        install_attention(tiny_llama(vocab=64), AttentionSpec(kv_bits=4, group_size=7))
    with pytest.raises(LowbitError, match="transformers model"):
        install_attention(torch.nn.Linear(4, 4), AttentionSpec(kv_bits=4))
    odd = tiny_llama(vocab=64)
    odd.config.head_dim = 18  # no Hadamard matrix of order 18
    for layer in attention_modules(odd):
        layer.head_dim = 18
    with pytest.raises(LowbitError, match="head size 18 can be built here; drop --kv-hadamard"):
        install_attention(odd, AttentionSpec(kv_bits=4, hadamard=True))


def test_capped_attention_logits_are_refused_not_a_traceback_from_sdpa():
    """Gemma 2 caps its attention logits, which transformers' SDPA function refuses mid-run."""
    model = tiny_family_model("gemma2")
    assert model.config.attn_logit_softcapping
    with pytest.raises(LowbitError, match="gemma2 caps its attention logits"):
        install_attention(model, AttentionSpec(kv_bits=16))


def test_a_common_key_offset_leaves_attention_unchanged():
    """q·(k − c) = q·k − q·c: the same shift for every key of a query, which softmax ignores."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(3))
    c = 5 * torch.randn(2, 1, 16, generator=g)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel(F.scaled_dot_product_attention(q, k - c, v, is_causal=True), plain) < 1e-5


def _first_layer_keys(model, ids):
    """Layer 0's keys after RoPE (B, Hkv, T, D), computed from transformers' own pieces."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    inner, attn = model.model, model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(inner.embed_tokens(ids))
    cos, sin = inner.rotary_emb(x, torch.arange(ids.shape[1]).unsqueeze(0))
    k = attn.k_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    return apply_rotary_pos_emb(k, k, cos, sin)[1]


def test_key_centres_are_the_mean_key_and_narrow_offset_keys():
    """A key head with a large common offset in its slowest RoPE channels (as real models'
    outlier channels are): the measured centre is the keys' mean, and 4-bit keys stored minus
    it are much closer to float than without."""
    model = tiny_family_model("qwen2")  # k_proj has a bias: the offset
    d = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(20)  # scores that matter (a random init's are near zero)
            attn.k_proj.weight.mul_(20)
            attn.k_proj.bias.view(-1, d)[:, [d // 2 - 1, d - 1]] += 80.0  # slowest rotary pair
    g = torch.Generator().manual_seed(4)
    calib, ids = (
        torch.randint(0, 64, (4, 32), generator=g),
        torch.randint(0, 64, (2, 32), generator=g),
    )
    layers = attention_modules(model)
    errors = {}
    with torch.inference_mode():
        ref = model(ids).logits
        assert not has_key_centers(model)
        for center in (False, True):
            install_attention(model, AttentionSpec(kv_bits=4, center_keys=center))
            if center:
                calibrate_key_centers(layers, lambda: model(calib), lambda t: t)
            errors[center] = rel(model(ids).logits, ref)
        expected = _first_layer_keys(model, calib).double().mean((0, 2)).float()
    assert has_key_centers(model)
    assert rel(getattr(layers[0], CENTER), expected) < 1e-5
    assert errors[True] < errors[False] / 2  # measured: 1.23 -> 0.44


def test_centred_keys_without_measured_centres_are_an_error():
    model = tiny_llama(vocab=64)
    install_attention(model, AttentionSpec(kv_bits=4, center_keys=True))
    with pytest.raises(LowbitError, match="never measured"), torch.inference_mode():
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LowbitError, match="give kv_bits"):
        AttentionSpec(query_bits=4, center_keys=True)

"""The static caches: float, and quantized codes with scales (same logits as the model's own
forward with the same rounding)."""

import pytest
import torch

from helpers import compact_and_hf, rel, tiny_family_model
from lowbit.formats.spec import AttentionSpec
from lowbit.kernels import decode, kv_attention
from lowbit.nn.attention import CENTER, add_key_centers, attention_modules, install_attention
from lowbit.runtime.kv_cache import CacheView, QuantKVCache, StaticKVCache, grown, move_row, shift
from lowbit.runtime.llama import LlamaForward


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "spec",
    [AttentionSpec(kv_bits=4, hadamard=True), AttentionSpec(kv_bits=8, group_size=8, query_bits=8),
     AttentionSpec(query_bits=4), AttentionSpec(kv_bits=4, group_size=8, center_keys=True),
     AttentionSpec(kv_bits=16)],
    ids=lambda s: s.short(),
)  # fmt: skip
@pytest.mark.parametrize("native", [True, False])
def test_compact_cache_equals_the_models_own_rounding(family, spec, native, monkeypatch):
    """Codes stored by the compact loop, token by token, give the logits transformers gives
    with lowbit's attention function rounding the whole window at once (decode steps attend
    over the stored codes: the native op, and its reference)."""
    if not native:  # the per-op loop with the reference attention (no one-call step)
        monkeypatch.setattr(kv_attention, "native_ops", lambda: False)
        monkeypatch.setattr(decode, "_native", lambda *t: False)
        monkeypatch.setattr(LlamaForward, "_step", None)
    model = tiny_family_model(family)
    install_attention(model, spec)
    if spec.center_keys:  # stand-in centres (quantization measures them)
        add_key_centers(model)
        for i, m in enumerate(attention_modules(model)):
            getattr(m, CENTER).normal_(generator=torch.Generator().manual_seed(i))
    ours, theirs, whole, cache = compact_and_hf(model, seed=3)
    assert isinstance(cache, QuantKVCache) == spec.codes
    assert cache.tensors[0].dtype == (torch.float16 if spec.float16 else torch.float32
                                      if not spec.codes else torch.uint8)  # fmt: skip
    assert rel(ours, theirs) < 1e-4 and rel(ours, whole) < 1e-4


def test_bytes_per_token_counts_codes_and_scales():
    dims = (3, 2, 4, 16, 64)  # layers, batch, kv heads, capacity, head dim
    full = StaticKVCache(*dims).bytes_per_token()
    assert full == 2 * 3 * 2 * 4 * 64 * 4
    four = QuantKVCache(*dims, bits=4, group=64).bytes_per_token()
    assert four == 2 * 3 * 2 * 4 * (32 + 4)  # 32 bytes of codes, float16 scale and minimum
    assert QuantKVCache(*dims, bits=8, group=32).bytes_per_token() == 2 * 3 * 2 * 4 * (64 + 8)
    half = StaticKVCache(*dims, dtype=torch.float16, read_as=torch.float32)
    assert half.bytes_per_token() == full // 2


def test_a_float16_cache_stores_rounded_clamped_values_and_reads_float32():
    """kv_bits 16: keys and values rounded to float16 (beyond its range: the largest float16,
    not infinity; NaN kept), read back as float32 for attention."""
    cache = StaticKVCache(1, 1, 1, 4, 8, dtype=torch.float16, read_as=torch.float32)
    k = torch.tensor([1 / 3, 1e6, -1e6, float("nan"), 1e-8, 65519.0, -2.5, 7.0]).view(1, 1, 1, 8)
    keys, values = cache.write(0, cache.reserve(1), k, -k)
    assert keys.dtype == torch.float32 and cache.tensors[0].dtype == torch.float16
    want = torch.tensor([1 / 3, 65504, -65504, float("nan"), 1e-8, 65504, -2.5, 7.0]).half()
    assert torch.equal(cache.tensors[0][0, 0, 0, 0].nan_to_num(), want.nan_to_num())
    assert torch.equal(keys[0, 0, 0].nan_to_num(), want.float().nan_to_num())
    assert torch.equal(values.nan_to_num(), -keys.nan_to_num())


def test_moving_rows_and_slots_moves_every_stored_tensor():
    cache = QuantKVCache(2, 2, 1, 8, 16, bits=4, group=16)
    g = torch.Generator().manual_seed(4)
    start = cache.reserve(3)
    k, v = torch.randn(2, 1, 3, 16, generator=g), torch.randn(2, 1, 3, 16, generator=g)
    before = [t.clone() for t in cache.write(1, start, k, v)]
    shift(cache, 2, 2)  # two slots of padding on the left
    after = CacheView(cache, slice(0, 2), length=cache.length)
    keys, values = after._decode([t[1, :, :, 2:5] for t in after.tensors[:3]]), None
    assert torch.equal(keys, before[0])
    move_row(cache, 1, 0)
    bigger = grown(cache, QuantKVCache(2, 2, 1, 16, 16, bits=4, group=16))
    assert torch.equal(bigger.tensors[3][:, 0, :, :5], bigger.tensors[3][:, 1, :, :5])
    assert bigger.length == 5 and values is None

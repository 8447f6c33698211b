"""The load-time swap to kernel modules, and q/k/v and gate/up run as one call each."""

import copy

import pytest
import torch

from helpers import tiny_family_model
from lowbit import api
from lowbit.models import use_kernels
from lowbit.models.modules import set_module
from lowbit.nn import QuantLinear, kernel_module


@pytest.mark.parametrize("recipe", ["w4-rtn-g64", "w8a8-dynamic"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_shared_inputs_keep_the_logits(family, recipe):
    model = tiny_family_model(family)
    api.quantize(model, recipe, progress=False)
    separate = copy.deepcopy(model)
    for name, module in list(separate.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(separate, name, kernel_module(module))
    counts = use_kernels(model)
    assert counts["shared-input groups"] == 2 * 2  # q/k/v and gate/up in each of 2 blocks
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert model.model.layers[0].self_attn.o_proj.shared is None
    ids = torch.randint(0, 64, (1, 40))
    with torch.inference_mode():
        for x in (ids, ids[:, :1]):  # prefill-sized and decode-sized
            a, b = separate(x).logits, model(x).logits
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_unknown_families_are_not_joined():
    model = tiny_family_model("llama")
    model.config.model_type = "something-else"
    api.quantize(model, "w4-rtn-g64", progress=False)
    counts = use_kernels(model)
    assert "shared-input groups" not in counts and counts["w4a16"] == 14


@pytest.mark.parametrize(
    ("recipe", "pooled", "block_pooled"),
    [("w4-sym-g32-head8", True, True), ("w4-g64-head16", True, True),
     ("w4-sym-g32", False, True), ("w8a8-dynamic-head8", False, False)],
)  # fmt: skip
def test_pooled_layers_are_the_kernel_layers_of_the_decode_pool(recipe, pooled, block_pooled):
    """4/8-bit affine and 16-bit float kernel layers run on lowbit's pool; a float32 head
    (``w4-sym-g32`` keeps it) and W8A8 layers do not."""
    from lowbit.kernels.build import native_ops
    from lowbit.models.kernels import pooled_layers

    if not native_ops():
        pytest.skip("native kernels unavailable here")
    model = tiny_family_model("llama")
    assert not pooled_layers(model)  # float
    api.quantize(model, recipe, progress=False)
    use_kernels(model)
    assert pooled_layers(model) is pooled
    assert pooled_layers(model.model.layers[0].mlp) is block_pooled

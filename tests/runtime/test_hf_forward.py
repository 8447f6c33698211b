"""The model's own forward as a runtime: a decode step of a model on lowbit's pooled kernels
holds torch's ops to one thread, with the same logits."""

import pytest
import torch

from helpers import decode_steps, rel, tiny_family_model
from lowbit import api
from lowbit.kernels.build import native_ops
from lowbit.models import use_kernels
from lowbit.runtime.hf_forward import HFForward


def test_decode_steps_of_a_pooled_model_hold_torch_to_one_thread():
    if not native_ops():
        pytest.skip("native kernels unavailable here")
    model = tiny_family_model("llama")
    api.quantize(model, "w4-sym-g32-head8", progress=False)
    use_kernels(model)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    g = torch.Generator().manual_seed(5)
    prompt, follow = (
        torch.randint(0, 64, (1, 40), generator=g),
        torch.randint(0, 64, (1, 3), generator=g),
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            held, _ = decode_steps(HFForward(model), prompt, follow, 48)
            assert seen == [2, 1, 1, 1]  # a 40-token prompt on torch's threads, each step on one
            plain = HFForward(model)
            plain._pooled = False
            free, _ = decode_steps(plain, prompt, follow, 48)
        assert seen[4:] == [2, 2, 2, 2]
    finally:
        torch.set_num_threads(before)
    assert rel(held, free) < 1e-5
    seen.clear()
    with torch.inference_mode():
        HFForward(model)(prompt[:, :32], HFForward(model).new_cache(1, 48))
    assert seen == [1]  # up to 32 tokens: the layers' GEMVs, on the pool

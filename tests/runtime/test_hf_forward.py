"""The model's own forward as a runtime: a short prompt into an empty cache, on a model whose
layers all run on lowbit's pooled kernels, holds torch's ops to one thread; nothing else
does (decode steps attend over the whole cache in torch)."""

import pytest
import torch

from helpers import rel, tiny_family_model, torch_threads
from lowbit import api
from lowbit.kernels.build import native_ops
from lowbit.models import use_kernels
from lowbit.runtime.hf_forward import HFForward


def test_only_short_prompts_into_an_empty_cache_hold_torch_to_one_thread():
    if not native_ops() or torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("native kernels unavailable here, or OpenMP runs them")
    model = tiny_family_model("llama")
    api.quantize(model, "w4-sym-g32-head8", progress=False)
    use_kernels(model)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch_threads(2), torch.inference_mode():
        forward = HFForward(model)
        cache = forward.new_cache(1, 48)
        held = forward(ids[:, :32], cache, all_logits=True)  # held
        forward(ids[:, 32:33], cache)  # a decode step: not held
        forward(ids[:, 33:40], forward.new_cache(1, 48))  # short, empty cache: held
        forward(ids, forward.new_cache(1, 48))  # 40 tokens: not held
        plain = HFForward(model)
        plain._pooled = False
        free = plain(ids[:, :32], plain.new_cache(1, 48), all_logits=True)
    assert seen == [1, 2, 1, 2, 2]
    assert rel(held, free) < 1e-5

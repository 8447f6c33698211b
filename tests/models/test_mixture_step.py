"""A decoded token's mixture block, router included, in one native call: the block's own
output to the bit (OLMoE, Mixtral, Qwen3-MoE; both kernel ISAs), and None wherever the call
does not apply or does not agree."""

import pytest
import torch

from helpers import tiny_moe
from lowbit import api
from lowbit.kernels.build import native_ops
from lowbit.models import mixture_step as mixture_step_module
from lowbit.models.experts import experts_to_linears
from lowbit.models.kernels import use_kernels
from lowbit.models.mixture_step import mixture_step

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def _quantized(kind: str, recipe: str = "w4-sym-g32", **extra):
    model = tiny_moe(kind, **extra)
    experts_to_linears(model)
    api.quantize(model, recipe, progress=False)
    use_kernels(model)
    return model


@needs_native
@pytest.mark.parametrize("isa", ["", "avx2"])
@pytest.mark.parametrize(
    ("kind", "extra"),
    [("olmoe", {}), ("olmoe", {"norm_topk_prob": True}), ("mixtral", {}), ("qwen3_moe", {})],
)
def test_the_blocks_own_output_to_the_bit(monkeypatch, isa, kind, extra):
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", isa)
    model = _quantized(kind, **extra)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for block in model.model.layers:
            step = mixture_step(block.mlp)
            assert step is not None
            for _ in range(4):
                h = torch.randn(1, 64, generator=g)
                assert torch.equal(step(h), block.mlp(h[None]).reshape(1, -1))


@needs_native
def test_blocks_it_cannot_take_keep_their_forward(monkeypatch, caplog):
    shared = _quantized("qwen2_moe")  # a shared expert beside the routed ones
    assert mixture_step(shared.model.layers[0].mlp) is None
    mixed = _quantized("olmoe", "w8-rtn")  # 8-bit experts: not the 4-bit GEMV
    assert mixture_step(mixed.model.layers[0].mlp) is None
    model = _quantized("olmoe")
    block = model.model.layers[0].mlp
    handle = block.experts.register_forward_hook(lambda m, a, out: None)
    assert mixture_step(block) is None  # calling the block would run the hook
    handle.remove()
    handle = block.experts._modules["1"].register_forward_pre_hook(lambda m, a: None)
    assert mixture_step(block) is None  # an expert's hook: the block's loop would run it
    handle.remove()
    assert mixture_step(block) is not None
    # a step that disagrees with the block (here: the other renormalisation) is not used
    monkeypatch.setattr(mixture_step_module, "_renormalises", lambda gate: True)
    with caplog.at_level("INFO"):
        assert mixture_step(block) is None
    assert "disagrees" in caplog.text


@needs_native
def test_a_mixtures_attention_runs_q_k_v_as_one_call():
    model = _quantized("olmoe")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.shared is not None and attn.q_proj.shared is attn.v_proj.shared


@needs_native
def test_hooks_added_later_send_the_token_through_the_block():
    model = _quantized("mixtral")
    block = model.model.layers[1].mlp
    step = mixture_step(block)
    seen = []
    block.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    h = torch.randn(1, 64)
    with torch.inference_mode():
        assert torch.equal(step(h), block(h[None]).reshape(1, -1))
    assert len(seen) == 2  # the step ran the block (and its router's hook), as the check did


@needs_native
def test_a_hook_added_later_inside_an_expert_is_run():
    model = _quantized("olmoe")
    block = model.model.layers[0].mlp
    step = mixture_step(block)
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        before = step(h)
        for e in range(block.experts.num_experts):  # every expert's output projection silenced
            block.experts._modules[str(e)].down_proj.register_forward_hook(
                lambda m, a, out: torch.zeros_like(out))  # fmt: skip
        after = step(h)
    assert before.abs().sum() > 0 and torch.equal(after, torch.zeros_like(after))


@needs_native
def test_a_router_the_op_cannot_take_keeps_the_block():
    model = _quantized("olmoe")
    block = model.model.layers[0].mlp
    for top_k in (0, block.experts.num_experts + 1):
        block.gate.top_k = top_k
        assert mixture_step(block) is None

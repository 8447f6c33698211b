"""The wiring of a decoder block derived by tracing it, on tiny random models of ten families:
groups in reading order, scale groups that fold exactly (the float model's outputs unchanged to
1e-5), agreement with the hand-written mappings, and AWQ / SmoothQuant on families nobody
mapped by hand."""

from __future__ import annotations

import pytest
import torch

from helpers import TRACED, tiny_family_model
from lowbit.calibration import block_output, capture_block_inputs
from lowbit.models.families import family_of, find_blocks
from lowbit.models.fold import can_fold, fold_scales
from lowbit.models.normalize import conv1d_to_linear
from lowbit.models.wiring import derive_family


def traced(family: str):
    model = tiny_family_model(family)
    conv1d_to_linear(model)
    _, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], torch.randint(0, 64, (2, 16)), 2)
    wiring = derive_family(blocks[0], lambda: block_output(blocks[0], calls[0]))
    return model, blocks, wiring


@pytest.mark.parametrize("family", TRACED)
def test_traced_scale_groups_fold_without_changing_the_float_model(family):
    model, blocks, wiring = traced(family)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        g = torch.Generator().manual_seed(0)
        for block in blocks:
            for group in wiring.scale_groups:
                prev = block.get_submodule(group.prev)
                linears = [block.get_submodule(n) for n in group.linears]
                s = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
                fold_scales(prev, group.prev_kind, linears, s)
        after = model(ids).logits
    assert len(wiring.scale_groups) >= 2  # the attention and MLP inputs at least
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TRACED)
def test_traced_groups_cover_every_linear_once_in_reading_order(family):
    _, blocks, wiring = traced(family)
    flat = [n for g in wiring.sequential for n in g]
    linears = [n for n, m in blocks[0].named_modules() if type(m) is torch.nn.Linear]
    assert sorted(flat) == sorted(linears) and len(flat) == len(set(flat))
    first = wiring.sequential[0]
    assert all("attn" in n or "c_attn" in n for n in first)  # attention inputs are read first


@pytest.mark.parametrize("family", ["llama", "gemma", "opt", "gpt2"])
def test_tracing_finds_what_the_hand_written_mapping_says(family):
    model, blocks, wiring = traced(family)
    mapped = family_of(model)
    found = {(g.prev, g.linears, g.prev_kind) for g in wiring.scale_groups}
    for group in mapped.scale_groups:
        prev = blocks[0].get_submodule(group.prev)
        linears = [blocks[0].get_submodule(n) for n in group.linears]
        if can_fold(prev, group.prev_kind, linears):  # v -> o folds only without grouped kv
            assert (group.prev, group.linears, group.prev_kind) in found
    assert [list(g) for g in wiring.sequential] == [
        [n for n in g if n in dict(blocks[0].named_modules())] for g in mapped.sequential
    ]


def test_gemma_norms_are_found_to_hold_one_plus_weight():
    _, _, wiring = traced("gemma3")
    kinds = {g.prev: g.prev_kind for g in wiring.scale_groups}
    assert kinds["input_layernorm"] == "norm_plus_one"
    assert kinds["pre_feedforward_layernorm"] == "norm_plus_one"
    assert "post_attention_layernorm" not in kinds  # it feeds the residual, not a linear


def test_a_gelu_between_two_linears_is_never_folded_through():
    _, _, wiring = traced("gpt2")
    assert not any(g.prev == "mlp.c_fc" for g in wiring.scale_groups)

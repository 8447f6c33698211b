import copy

import pytest
import torch

from helpers import tiny_family_model
from lowbit.algorithms.gptq import GPTQOptions, gptq
from lowbit.calibration import collect_input_stats, run_sequential
from lowbit.formats import WeightSpec
from lowbit.models.families import family_of, find_blocks, sequential_groups
from lowbit.pipeline.calibrated import gptq_fit, hessian_block

SPEC = WeightSpec(bits=3, group_size=32)
OPTIONS = GPTQOptions()


def whole_model_gptq(model, windows):
    """The naive way: statistics from full-model forward passes, with the layers quantized so
    far in place, for every group of every block."""
    _, blocks = find_blocks(model)
    out = {}
    for index, block in enumerate(blocks):
        for group in sequential_groups(block, family_of(model), true_sequential=True):
            modules = {n: block.get_submodule(n) for n in group}
            with collect_input_stats(modules, hessian=True) as stats, torch.no_grad():
                for batch in windows.split(2):
                    model(input_ids=batch, use_cache=False)
            for name, module in modules.items():
                q = gptq(module.weight, stats[name].hessian(), SPEC, OPTIONS)
                module.weight.data.copy_(q.dequantize())
                out[f"model.layers.{index}.{name}"] = q
    return out


def test_block_runner_equals_quantizing_through_the_whole_model():
    model = tiny_family_model("llama")
    windows = torch.randint(0, 64, (6, 32))
    reference = whole_model_gptq(copy.deepcopy(model), windows)
    prefix, blocks = find_blocks(model)
    results = {}

    def handler(ctx):
        plan = {n: SPEC for g in sequential_groups(ctx.block, family_of(model), True) for n in g}
        groups = sequential_groups(ctx.block, family_of(model), True)
        hessian_block(ctx, plan, groups, gptq_fit(OPTIONS), results)

    report = run_sequential(model, blocks, prefix, windows, handler, batch_size=2, progress=False)
    assert sorted(results) == sorted(reference)
    for name, q in results.items():
        same = (q.codes == reference[name].codes).float().mean().item()
        assert same > 0.999, name  # identical up to a rare float tie
    assert [r.name for r in report] == ["model.layers.0", "model.layers.1"]
    assert all(0 < r.output_error < 1 for r in report)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_block_errors_are_measured_on_every_block(batch_size):
    model = tiny_family_model("qwen2")
    prefix, blocks = find_blocks(model)
    report = run_sequential(model, blocks, prefix, torch.randint(0, 64, (4, 16)), lambda ctx: None,
                            batch_size=batch_size, progress=False)  # fmt: skip
    assert [r.output_error for r in report] == [0.0, 0.0]  # nothing quantized, nothing lost

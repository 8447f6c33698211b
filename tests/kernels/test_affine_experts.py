"""Several 4-bit matrices in one native call (a token's experts): equal to the bit to one
affine_linear call per matrix, on both ISAs, and to the reference where the op cannot run."""

import pytest
import torch

from helpers import random_affine
from lowbit.kernels import affine
from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def _one_by_one(x, aws, route=None):  # one affine_linear call per matrix, summed in order
    return affine.affine_experts_reference(x, aws, route)


@needs_native
@pytest.mark.parametrize("isa", ["", "avx2"])
@pytest.mark.parametrize(
    ("k", "group", "params"),
    [
        (32, 32, "f16"),
        (256, 32, "sym"),
        (288, 32, "f16"),
        (256, 64, "f32"),
        (288, 96, "f32"),
        (320, 32, "f32"),
        (256, 128, "sym"),
    ],
)
def test_one_call_equals_one_call_per_matrix_to_the_bit(monkeypatch, isa, k, group, params):
    """Groups of 32 (the one-row kernels, a last half chunk at K = 288; K = 32, no whole
    chunk: the general kernel) and others, with and
    without offsets, float16 and float32 params; x shared or one row per matrix; routed."""
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", isa)
    aws = [random_affine(48, k, group, 4, seed=s, params=params) for s in range(5)]
    g = torch.Generator().manual_seed(1)
    shared, rows = torch.randn(1, k, generator=g), torch.randn(5, k, generator=g)
    route = torch.rand(5, generator=g)
    for x in (shared, rows):
        assert torch.equal(affine.affine_experts(x, aws), _one_by_one(x, aws))
        assert torch.equal(affine.affine_experts(x, aws, route), _one_by_one(x, aws, route))


@needs_native
def test_rows_split_across_matrices_by_any_thread_count():
    aws = [random_affine(40, 128, 32, 4, seed=s, params="f16") for s in range(3)]
    x = torch.randn(3, 128)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):  # chunks of 120 rows over 3 matrices of 40 cross them
            torch.set_num_threads(threads)
            outs.append(affine.affine_experts(x, aws))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_reference_computes_the_same_sum():
    aws = [random_affine(24, 128, 32, 4, seed=s, params="sym") for s in range(3)]
    x, route = torch.randn(3, 128), torch.rand(3)
    want = torch.stack([affine.affine_linear_act8_reference(x[e][None], aw)[0] for e, aw in
                        enumerate(aws)])  # fmt: skip
    got = affine.affine_experts_reference(x, aws, None)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    summed = affine.affine_experts_reference(x, aws, route)
    assert torch.allclose(summed[0], (want * route[:, None]).sum(0), rtol=1e-5, atol=1e-5)


def test_weights_of_other_shapes_or_layouts_are_refused():
    x = torch.randn(1, 128)
    same = [random_affine(24, 128, 32, 4, seed=0), random_affine(24, 128, 32, 4, seed=1)]
    assert affine.experts_fit(same, 128) and not affine.experts_fit(same, 96)
    assert not affine.experts_fit([], 128)
    others = [(16, 128, 32, 4, "f32"), (24, 128, 64, 4, "f32"), (24, 128, 32, 4, "sym"),
              (24, 128, 32, 8, "f32")]  # fmt: skip
    for n, k, group, bits, params in others:
        other = random_affine(n, k, group, bits, params=params)
        assert not affine.experts_fit([same[0], other], 128)
        with pytest.raises(ValueError, match="other shapes or layouts"):
            affine.affine_experts(x, [same[0], other])
    with pytest.raises(ValueError, match="1 or E rows"):
        affine.affine_experts(torch.randn(3, 128), same)
    with pytest.raises(ValueError, match="route E weights"):
        affine.affine_experts(x, same, torch.rand(2, 1))

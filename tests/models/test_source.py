"""Lazy checkpoint sources: a meta skeleton, tensors read one block at a time."""

import torch

from lowbit.models.source import TensorSource, materialize, release, skeleton


def test_skeleton_allocates_nothing_and_blocks_materialise_exactly(tiny_folder, tiny_model):
    model = skeleton(tiny_folder)
    assert all(p.is_meta for p in model.parameters())
    source = TensorSource(tiny_folder)
    source.check(model)
    block = model.model.layers[1]
    names = [f"model.layers.1.{k}" for k in block.state_dict()]
    read = materialize(model, names, source)
    assert read == sum(source.entries[n].nbytes for n in names)
    for k, t in block.state_dict().items():
        assert torch.equal(t, tiny_model.state_dict()[f"model.layers.1.{k}"])
    assert all(p.is_meta for p in model.model.layers[0].parameters())
    release(block)
    assert all(p.is_meta for p in block.parameters())


def test_tied_output_embedding_follows_the_input_embedding(tiny_folder):
    model = skeleton(tiny_folder)
    source = TensorSource(tiny_folder)
    assert "lm_head.weight" not in source  # tied: saved once
    materialize(model, ["model.embed_tokens.weight", "lm_head.weight"], source)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta

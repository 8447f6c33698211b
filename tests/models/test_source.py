"""Lazy checkpoint sources: a meta skeleton, tensors read one block at a time."""

import pytest
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


@pytest.mark.parametrize("layout", ["head alone", "both, equal", "both, different"])
def test_tied_pairs_are_read_as_transformers_reads_them(tiny_folder, tmp_path, layout):
    """config.json ties the head to the embedding; checkpoints store the pair in other forms
    too. The streamed run and the in-memory one (transformers' load) write the same folder,
    whose model computes what transformers' does: the head alone was refused, an equal copy
    was written twice, and a different head was replaced by the embedding (silently)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from helpers import make_recipe
    from lowbit import api

    folder = tmp_path / "src"
    shutil.copytree(tiny_folder, folder)
    state = load_file(folder / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    if layout == "head alone":
        state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    else:
        other = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)) * 0.05
        state["lm_head.weight"] = embed.clone() if layout == "both, equal" else other
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    recipe = make_recipe({"bits": 8, "group_size": -1, "symmetric": True})
    streamed, _ = api.quantize_to(str(folder), recipe, tmp_path / "s", progress=False)
    src = api.load_model(str(folder))
    memory = api.save(src.model, tmp_path / "m", api.quantize(src.model, recipe, progress=False),
                      source=src)  # fmt: skip
    names = {d: sorted(k for k in load_file(d / "model.safetensors") if "layers" not in k)
             for d in (streamed, memory)}  # fmt: skip
    assert names[streamed] == names[memory]
    assert ("lm_head.weight" in names[memory]) == (layout == "both, different")
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).lm_head.weight
        for out in (streamed, memory):
            model = api.load(out, kernels=False).model
            assert torch.equal(model.lm_head.weight, want)
            assert (model.lm_head.weight is model.model.embed_tokens.weight) == (
                layout != "both, different")  # fmt: skip
        logits = [api.load(d, kernels=False).model(ids).logits for d in (streamed, memory)]
    assert torch.equal(*logits)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_checkpoints_saved_without_the_models_prefix_stream(family, tmp_path):
    """GPT-2's and OPT's own hub checkpoints name their tensors from the base model
    (``h.0.attn.c_attn.weight``, ``decoder.layers.0...``), as transformers loads them with its
    prefix added: the streamed run reads them so, and equals the run on the loaded model."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from helpers import make_recipe, make_tokenizer, rel, tiny_family_model
    from lowbit import api
    from lowbit.algorithms.rotate import RotateOptions

    model = tiny_family_model(family)
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    head = f"{model.base_model_prefix}."
    state = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith(head) for k in state)
    bare = {k.removeprefix(head): v for k, v in state.items()}
    save_file(bare, str(folder / "model.safetensors"), metadata={"format": "pt"})
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=RotateOptions())  # fmt: skip
    out, _ = api.quantize_to(str(folder), recipe, tmp_path / "q", progress=False)
    src = api.load_model(str(folder))  # transformers adds the prefix
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        api.quantize(src.model, recipe, progress=False)
        assert rel(api.load(out, kernels=False).model(ids).logits, src.model(ids).logits) < 1e-5


def test_a_head_stored_under_the_familys_old_name_streams(tmp_path):
    """GPT-NeoX (Pythia) checkpoints store the head as ``embed_out``, which transformers
    renames to ``lm_head`` by a rule filed under the class name, not the model type."""
    from safetensors import safe_open

    from helpers import make_recipe, make_tokenizer, tiny_family_model
    from lowbit import api

    folder = tmp_path / "neox"
    tiny_family_model("gpt_neox").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = set(f.keys())  # (a safe_open handle has no membership test)
    assert "embed_out.weight" in stored and "lm_head.weight" not in stored
    recipe = make_recipe({"bits": 4, "group_size": 16}, ignore=())  # the head quantized too
    out, _ = api.quantize_to(str(folder), recipe, tmp_path / "q", progress=False)
    src = api.load_model(str(folder))
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        api.quantize(src.model, recipe, progress=False)
        assert torch.equal(api.load(out, kernels=False).model(ids).logits, src.model(ids).logits)


def _block_fp8(folder, out, block: int = 32):
    """``folder`` re-saved as block-scaled FP8 (DeepSeek-V3's layout: each projection in
    float8_e4m3fn with a ``weight_scale_inv`` per block); and the float folder of exactly the
    weights it stands for."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    shutil.copytree(folder, out.with_name(out.name + "-float"))
    tensors, fp8, exact = load_file(folder / "model.safetensors"), {}, {}
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            rows, cols = w.shape
            blocks = w.reshape(rows // block, block, cols // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            fp8[name], fp8[f"{name}_scale_inv"] = q, scale.contiguous()
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            exact[name] = q.float() * full
        else:
            fp8[name] = exact[name] = w
    save_file(fp8, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(exact, str(out.with_name(out.name + "-float") / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "weight_block_size": [block, block]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out, out.with_name(out.name + "-float")


def test_a_block_fp8_checkpoint_streams_as_the_float_weights_it_stands_for(tiny_folder, tmp_path):
    from helpers import make_recipe
    from lowbit import api

    fp8, exact = _block_fp8(tiny_folder, tmp_path / "fp8")
    recipe = make_recipe({"bits": 4, "group_size": 32})
    a, _ = api.quantize_to(str(fp8), recipe, tmp_path / "a", progress=False, canary=False)
    b, _ = api.quantize_to(str(exact), recipe, tmp_path / "b", progress=False, canary=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not any(n.endswith("_scale_inv") for n in TensorSource(fp8).entries)


def test_a_checkpoint_quantized_another_way_is_refused(tiny_folder):
    import json

    from lowbit.errors import LowbitError

    config = json.loads((tiny_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="already quantized .*'gptq'.*original model"):
        TensorSource(tiny_folder)

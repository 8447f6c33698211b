"""The dry-run estimate of a streamed run: sizes from shapes, a probe of the first blocks, disk."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from helpers import MOE_SMALL, make_recipe, make_tokenizer
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models.tensorfile import read_header

RTN = make_recipe({"bits": 4, "group_size": 32})


def written_bytes(folder) -> int:
    return sum(e.nbytes for f in folder.glob("*.safetensors") for e in read_header(f)[0].values())


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "hadamard"])
def test_output_bytes_are_what_the_run_writes(tiny_folder, tmp_path, rotate):
    from lowbit.algorithms.rotate import RotateOptions

    recipe = dataclasses.replace(RTN, rotate=RotateOptions(kind="hadamard")) if rotate else RTN
    plan = api.estimate(str(tiny_folder), recipe, None, progress=False, canary=False)
    out, _ = api.quantize_to(str(tiny_folder), recipe, tmp_path / "q", progress=False,
                             canary=False)  # fmt: skip
    # with the rotation, the embedding is written in float32 and the tied head as its own table
    assert plan["output_bytes"] == written_bytes(out)
    assert plan["disk_bytes"] >= 2 * plan["output_bytes"]


def test_tensors_the_run_leaves_out_are_not_counted(tiny_folder, tmp_path):
    """A checkpoint's tensors outside the model (GPT-2 hub files' causal masks, old rotary
    tables) are dropped by the run; the estimate (and the disk check on it) counted them."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extras"
    shutil.copytree(tiny_folder, folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    state["model.layers.1.attn.bias"] = torch.ones(1, 1, 256, 256)
    state["causal_mask"] = torch.ones(256, 256)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    plan = api.estimate(str(folder), RTN, None, progress=False, canary=False)
    out, _ = api.quantize_to(str(folder), RTN, tmp_path / "q", progress=False, canary=False)
    assert plan["output_bytes"] == written_bytes(out)


def test_bits_per_weight_are_counted_as_the_run_counts_them(tmp_path):
    """BLOOM's layers have biases: they are written, but not part of bits/weight."""
    from helpers import tiny_family_model
    from lowbit.eval.size import model_size

    tiny_family_model("bloom").save_pretrained(tmp_path / "bloom")
    make_tokenizer().save_pretrained(tmp_path / "bloom")
    plan = api.estimate(str(tmp_path / "bloom"), RTN, None, progress=False, canary=False)
    out, _ = api.quantize_to(str(tmp_path / "bloom"), RTN, tmp_path / "q", progress=False,
                             canary=False)  # fmt: skip
    saved = model_size(api.load(str(out), kernels=False).model).bits_per_weight
    assert plan["bits_per_weight"] == pytest.approx(saved) == pytest.approx(5.0)
    assert plan["output_bytes"] == written_bytes(out)


def test_the_probe_reaches_the_first_block_of_each_shape(tmp_path):
    """A mixture whose first blocks are dense: the probe runs up to its first mixture block."""
    import torch
    import transformers as tf

    config = tf.Qwen2MoeConfig(**{**MOE_SMALL, "num_hidden_layers": 4}, intermediate_size=128,
                               num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2,
                               shared_expert_intermediate_size=64,
                               mlp_only_layers=[0, 1])  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    plan = api.estimate(str(tmp_path / "moe"), RTN, None, progress=False, canary=False)
    assert plan["probe"]["blocks"] == 3 and plan["blocks"] == 4


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_any_work(tiny_folder, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(LowbitError, match="more disk beside --out"):
        api.quantize_to(str(tiny_folder), RTN, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]

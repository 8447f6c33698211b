"""compressed-tensors export, checked by its real consumer (transformers + compressed-tensors)."""

import pytest
import torch

from helpers import make_recipe, quantized_folder
from lowbit.errors import LowbitError
from lowbit.export import export

pytest.importorskip("compressed_tensors")


def _transformers_logits(folder, x):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(
    "weights",
    [
        {"bits": 4, "group_size": 32, "symmetric": True},
        {"bits": 8, "group_size": -1, "symmetric": True},
        {"bits": 3, "group_size": 32, "symmetric": True},
    ],
    ids=["w4-sym-g32", "w8-channel", "w3-sym-g32"],
)
def test_transformers_loads_export_with_identical_logits(tiny_folder, tmp_path, weights):
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", make_recipe(weights))
    out = export(folder, "compressed-tensors", tmp_path / "ct").path
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours = model(x).logits
    assert torch.allclose(_transformers_logits(out, x), ours, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").exists()


def test_w8a8_export_declares_per_token_activations(tiny_folder, tmp_path):
    import json

    acts = {"bits": 8, "granularity": "token", "dynamic": True}
    rec = make_recipe({"bits": 8, "group_size": -1, "symmetric": True}, acts)
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", rec)
    out = export(folder, "compressed-tensors", tmp_path / "ct").path
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours = model(x).logits
    theirs = _transformers_logits(out, x)
    # transformers runs symmetric 8-bit activation codes per token, as lowbit does, but
    # compressed-tensors' reference divides each token's largest magnitude by 127.5 (half its
    # 255 steps) where lowbit divides by 127: close, and the same once that divisor is lowbit's
    err = (theirs - ours).abs().max() / ours.abs().max()
    assert err < 0.02
    import sys

    import compressed_tensors.quantization.utils.helpers as helpers

    original = helpers.calculate_qparams

    def divide_by_127(min_vals, max_vals, args, *rest, **kwargs):
        scale, zero = original(min_vals, max_vals, args, *rest, **kwargs)
        return (scale * 127.5 / 127 if args.dynamic else scale), zero

    with pytest.MonkeyPatch.context() as mp:
        for module in list(sys.modules.values()):  # where its callers imported it
            if getattr(module, "calculate_qparams", None) is original:
                mp.setattr(module, "calculate_qparams", divide_by_127)
        same = _transformers_logits(out, x)
    assert (same - ours).abs().max() / ours.abs().max() < 1e-5


def test_float_offset_grid_is_a_clear_error(tiny_folder, tmp_path):
    folder, _ = quantized_folder(tiny_folder, tmp_path / "q", "w4-rtn-g32")
    with pytest.raises(LowbitError, match=r"q_proj.*float offsets.*zero_point: int"):
        export(folder, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_interrupted_export_leaves_no_partial_folder(tiny_folder, tmp_path, monkeypatch):
    from lowbit.export import compressed

    rec = make_recipe({"bits": 4, "group_size": 32, "symmetric": True})
    folder, _ = quantized_folder(tiny_folder, tmp_path / "q", rec)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compressed, "copy_side_files", boom)
    with pytest.raises(KeyboardInterrupt):
        export(folder, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ct")]


def test_gpt2_conv1d_layers_are_refused_not_left_random(tmp_path):
    """transformers decompresses into nn.Linear only: GPT-2's Conv1D layers would load with
    random weights and no warning."""
    from helpers import make_tokenizer, tiny_family_model

    src = tmp_path / "gpt2"
    tiny_family_model("gpt2").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    rec = make_recipe({"bits": 4, "group_size": 32, "symmetric": True})
    folder, _ = quantized_folder(src, tmp_path / "q", rec)
    with pytest.raises(LowbitError, match=r"c_attn is a GPT-2-style Conv1D.*ONNX"):
        export(folder, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_linear_subclasses_are_exported_with_a_warning_that_transformers_cannot_load_them(
    tmp_path, caplog
):
    from helpers import make_tokenizer, tiny_family_model

    src = tmp_path / "falcon"
    tiny_family_model("falcon").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    rec = make_recipe({"bits": 4, "group_size": 32, "symmetric": True})
    folder, _ = quantized_folder(src, tmp_path / "q", rec)
    with caplog.at_level("WARNING"):
        export(folder, "compressed-tensors", tmp_path / "ct")
    assert "were FalconLinear" in caplog.text and (tmp_path / "ct" / "config.json").exists()


def test_a_sharded_folder_exports_only_its_new_weights(tiny_folder, tmp_path, monkeypatch):
    """lowbit's packed shards and their index stayed beside the export's model.safetensors: a
    loader that follows the index (vLLM's) would read them."""
    from lowbit import api

    monkeypatch.setattr("lowbit.models.checkpoint.MAX_SHARD_BYTES", 20_000)
    recipe = make_recipe({"bits": 4, "group_size": 32, "symmetric": True})
    folder, _ = api.quantize_to(str(tiny_folder), recipe, tmp_path / "q", progress=False)
    assert (folder / "model.safetensors.index.json").is_file()
    out = export(folder, "compressed-tensors", tmp_path / "ct").path
    weights = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
    assert weights == ["model.safetensors"] and (out / "tokenizer.json").is_file()
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        ours = api.load(folder, kernels=False).model(x).logits
    assert torch.allclose(_transformers_logits(out, x), ours, atol=1e-5, rtol=0)

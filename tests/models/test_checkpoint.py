import logging
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models import checkpoint as checkpoint_module
from lowbit.models import load_folder, save_folder
from lowbit.models.arena import tensor_slots
from lowbit.models.kernels import use_kernels
from lowbit.nn import QuantLinear


def quantized_copy(folder, recipe):
    src = api.load_model(str(folder))
    report = api.quantize(src.model, recipe, progress=False)
    return src, report


def test_save_then_load_reproduces_outputs_exactly(tiny_folder, tmp_path):
    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded = api.load(out, kernels=False)
    assert loaded.kind == "lowbit"
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, QuantLinear)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, src.model(x).logits)
    assert loaded.tokenizer is not None
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied


def test_quantized_lm_head_unties_and_round_trips(tiny_folder, tmp_path):
    recipe = api.load_recipe("w4-rtn-g32").__class__.from_dict(
        {"version": 1, "weights": {"bits": 4, "group_size": 32}}
    )
    src, report = quantized_copy(tiny_folder, recipe)
    assert "lm_head" in report.layers
    assert src.model.config.tie_word_embeddings is False
    out = api.save(src.model, tmp_path / "q", report, source=src)
    loaded = api.load(out, kernels=False).model
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, src.model(x).logits)


def test_manifest_records_provenance(tiny_folder, tmp_path):
    src, report = quantized_copy(tiny_folder, "w3-rtn-g32")
    manifest = load_folder(api.save(src.model, tmp_path / "q", report, source=src, seed=7))[1]
    assert manifest["recipe"]["name"] == "w3-rtn-g32"
    assert manifest["seed"] == 7
    assert manifest["torch_version"] == torch.__version__
    assert manifest["source"] == {"model": str(tiny_folder), "kind": "folder"}
    layer = manifest["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["format"] == "int3-asym-g32" and layer["bits_per_weight"] == 4.0


def test_existing_output_is_not_replaced_without_overwrite(tiny_folder, tmp_path):
    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")
    out = api.save(src.model, tmp_path / "q", report, source=src)
    with pytest.raises(LowbitError, match="--overwrite"):
        api.save(src.model, out, report, source=src)
    api.save(src.model, out, report, source=src, overwrite=True)


def test_interrupted_save_leaves_no_folder(tiny_folder, tmp_path, monkeypatch):
    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "write_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_folder(src.model, tmp_path / "q", {"layers": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # no partial, no temp


def test_truncated_weights_file_is_a_clear_error(tiny_folder, tmp_path):
    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")
    out = api.save(src.model, tmp_path / "q", report, source=src)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LowbitError, match="model.safetensors is truncated"):
        api.load(out)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("files", {"model.safetensors": [1]}, "files.model.safetensors must be a mapping"),
        ("blocks", [{"output_rel_mse": 0.1}], "blocks.0. must be a mapping with its block"),
        ("metrics", {"eval": {"ppl": "abc"}}, "metrics.eval.ppl must be a number"),
        ("canary", {"kl": 0.1}, "canary.tolerance must be present"),
        ("canary", {"tolerance": "x"}, "canary.tolerance must be a number"),
        ("canary", "yes", "canary must be a mapping"),
        ("source", "abc", "source must be a mapping"),
        ("recipe", "x", "recipe must be a mapping"),
    ],
)
def test_an_edited_manifest_is_one_line_naming_the_field(tiny_folder, tmp_path, field, value,
                                                         said):  # fmt: skip
    import json

    from lowbit.models.checkpoint import read_manifest

    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")
    out = api.save(src.model, tmp_path / "q", report, source=src)
    manifest = json.loads((out / "lowbit.json").read_text())
    read_manifest(out)  # as saved: fine
    (out / "lowbit.json").write_text(json.dumps(manifest | {field: value}))
    with pytest.raises(LowbitError, match=said):
        read_manifest(out)


def test_load_with_kernels_matches_reference(tiny_folder, tmp_path):
    src, report = quantized_copy(tiny_folder, "w4-rtn-g32")
    out = api.save(src.model, tmp_path / "q", report, source=src)
    fast = api.load(out).model  # kernels on (the default)
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    x = torch.randint(0, 50, (2, 40))  # 80 rows: float inputs, QuantLinear's numbers
    with torch.no_grad():
        ref, got = src.model(x).logits, fast(x).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    x = x[:1, :8]  # decode-sized: int8 inputs per block (the act8 path), close but not equal
    with torch.no_grad():
        ref, got = src.model(x).logits, fast(x).logits
    assert 0 < (got - ref).norm() / ref.norm() < 1e-2


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc maps")
@pytest.mark.parametrize(
    ("recipe", "kernels"), [("w4-sym-g32", True), ("w4-sym-g32", False), ("w8a8-dynamic", True)]
)
def test_a_loaded_folder_lets_go_of_its_file_maps(tiny_folder, tmp_path, recipe, kernels,
                                                  caplog):  # fmt: skip
    # A tensor left reading a shard's memory map (a norm, a layer no kernel converts, a W8A8
    # kernel's scales) kept the whole map, every page read through it, resident beside the
    # converted copies. Every tensor moves into one block (a stacked q/k/v weight too, held by
    # a SharedInput): none is left held twice.
    src, report = quantized_copy(tiny_folder, recipe)
    out = api.save(src.model, tmp_path / "q", report, source=src)
    with caplog.at_level(logging.WARNING):
        loaded = api.load(out, kernels=kernels).model
    assert "held elsewhere" not in caplog.text and "still mapped" not in caplog.text
    assert str(out / "model.safetensors") not in Path("/proc/self/maps").read_text()
    block = loaded.lm_head.weight.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == block for t, _ in tensor_slots(loaded)
               if t.numel())  # fmt: skip
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    reading_the_map = load_folder(out)[0]  # no prepare: its tensors keep reading the map
    assert str(out / "model.safetensors") in Path("/proc/self/maps").read_text()  # (it maps)
    if kernels:
        use_kernels(reading_the_map)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, reading_the_map(x).logits)

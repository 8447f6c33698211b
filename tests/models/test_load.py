import pytest

from lowbit.errors import LowbitError
from lowbit.models import load as load_module
from lowbit.models import load_model


def test_hf_folder(tiny_folder):
    loaded = load_model(str(tiny_folder))
    assert loaded.kind == "folder" and loaded.tokenizer is not None


@pytest.mark.parametrize("source", ["./nope", "/no/such/model", "nope/deeper/path"])
def test_missing_paths(source):
    with pytest.raises(LowbitError, match="no such file or folder"):
        load_model(source)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(LowbitError, match="not a model folder"):
        load_model(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LowbitError, match="could not read GGUF file"):
        load_model(str(bad))


def test_other_files_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LowbitError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_hub_id_offline_fails_fast_naming_the_alternatives(monkeypatch):
    monkeypatch.setattr(load_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(LowbitError, match="not a zoo name.*hub is unreachable"):
        load_model("some-org/some-model-that-is-not-cached")


def _copy(tiny_folder, tmp_path, name):
    import shutil

    folder = tmp_path / name
    shutil.copytree(tiny_folder, folder)
    return folder


def test_a_broken_hf_folder_is_one_line_never_a_model_with_random_weights(
    tiny_folder, tmp_path, caplog
):
    """The in-memory load (eval, generate, chat) checks the checkpoint as a streamed run does:
    a pickle is never read, a missing, cut or misshapen tensor is an error (transformers would
    fill it with random values), tensors the config does not cover are named."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    pickled = _copy(tiny_folder, tmp_path, "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(LowbitError, match="does not read pickled"):
        load_model(str(pickled))

    dropped = _copy(tiny_folder, tmp_path, "dropped")
    tensors = load_file(dropped / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, dropped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="o_proj.weight' that config.json implies is missing"):
        load_model(str(dropped))

    cut = _copy(tiny_folder, tmp_path, "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="is truncated"):
        load_model(str(cut))

    for name, change, said in (
        ("heads", {"num_attention_heads": 3}, "not a multiple of the number of attention heads"),
        ("kind", {"model_type": "frobnicator"}, "model_type 'frobnicator' is not an architecture"),
        ("typed", {"hidden_size": "64"}, "cannot read the model config"),
    ):
        folder = _copy(tiny_folder, tmp_path, name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(LowbitError, match=said):
            load_model(str(folder))

    fewer = _copy(tiny_folder, tmp_path, "fewer")
    config = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    assert load_model(str(fewer)).model.config.num_hidden_layers == 1
    assert "tensor(s) of the checkpoint are not in the model config.json describes" in caplog.text

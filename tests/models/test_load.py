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

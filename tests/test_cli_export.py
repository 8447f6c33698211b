"""``lowbit export`` end to end on a tiny random model."""

import json

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def w4g32(tmp_path, tiny_folder, capsys):
    out = tmp_path / "q"
    assert (
        run(capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g32", "--out", str(out))[0]
        == 0
    )
    return out


def test_export_onnx_prints_json_and_writes_the_folder(w4g32, tmp_path, capsys):
    target = tmp_path / "onnx"
    code, out, _ = run(
        capsys, "export", str(w4g32), "--format", "onnx", "--out", str(target), "--json"
    )
    assert code == 0
    info = json.loads(out)
    assert info["format"] == "onnx" and info["bytes"] > 0
    assert (target / "model.onnx").exists() and (target / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "compressed-tensors"], "float offsets"),
        (["--format", "onnx", "--requantize", "q8_0"], "--requantize applies to GGUF"),
        (["--format", "litert", "--requantize", "q4_0"], "not a litert choice"),
        (["--format", "gguf", "--requantize", "int8"], "not a gguf choice"),
        (["--format", "litert", "--cache", "64"], "--cache sizes the KV-cache signatures"),
    ],
)
def test_bad_export_is_one_line_and_writes_nothing(w4g32, tmp_path, capsys, args, message):
    target = tmp_path / "x"
    code, _, err = run(capsys, "export", str(w4g32), *args, "--out", str(target))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lowbit: error:") and message in err
    assert not target.exists()


def test_not_a_lowbit_folder_and_existing_output(w4g32, tiny_folder, tmp_path, capsys):
    code, _, err = run(
        capsys, "export", str(tiny_folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf")
    )
    assert code == 2 and "not a lowbit folder" in err
    code, _, err = run(capsys, "export", str(w4g32), "--format", "onnx", "--out", str(w4g32))
    assert code == 2 and "lies inside the input" in err  # with or without --overwrite


def test_export_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "usage: lowbit export" in out and "Q4_1" in out and "MatMulNBits" in out
    assert "--kv-cache" in out and "litert" in out and "lowbit[litert]" in out


def test_litert_refuses_asymmetric_codes_naming_the_layer(w4g32, tmp_path, capsys):
    pytest.importorskip("litert_torch", reason="the litert extra is not installed")
    target = tmp_path / "m.tflite"
    code, _, err = run(capsys, "export", str(w4g32), "--format", "litert", "--out", str(target))
    assert code == 2 and err.count("\n") == 1
    assert "model.layers.0.self_attn.q_proj: asymmetric codes" in err and "--requantize" in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny-llama"]


def test_eval_of_a_tflite_lowbit_did_not_write_is_one_line(tmp_path, capsys):
    pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
    bad = tmp_path / "other.tflite"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "eval", str(bad), "--seqlen", "16", "--tokens", "32")
    assert code == 2 and err.count("\n") == 1 and "other.tflite" in err
    for size in (0, 8):  # empty, or cut short (the interpreter's verifier refused it raw)
        bad.write_bytes(bad.read_bytes()[:size])
        code, _, err = run(capsys, "eval", str(bad), "--seqlen", "16", "--tokens", "32")
        assert code == 2 and err.count("\n") == 1 and "other.tflite" in err, err

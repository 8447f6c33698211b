"""lowbit analyze, quantize --target-bits / --target-size, and lowbit diff on a tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


CALIB = ("--calib-samples", "4", "--calib-seqlen", "32")


def test_analyze_prints_json_writes_the_plot_and_the_measurements(
    tmp_path, tiny_folder, text_file, capsys
):
    plot, out = tmp_path / "sens.png", tmp_path / "sens.json"
    code, stdout, err = run(
        capsys, "analyze", str(tiny_folder), "--recipe", "w4-rtn-g64", "--calib", str(text_file),
        *CALIB, "--candidates", "2", "4", "float", "--plot", str(plot), "--out", str(out), "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(stdout)
    assert set(data["candidates"]) == {"int2", "int4", "float"}
    assert len(data["layers"]) == 14 and "all" in data["rank_correlation"]
    assert plot.read_bytes()[:4] == b"\x89PNG" and json.loads(out.read_text()) == data
    same = tmp_path / "both"
    code, _, err = run(capsys, "analyze", str(tiny_folder), "--recipe", "w4-rtn-g64",
                       "--plot", str(same), "--out", str(same))  # fmt: skip
    assert code == 2 and "--out and --plot are the same file" in err and not same.exists()


def test_target_bits_gives_a_mixed_model_within_the_budget(tmp_path, tiny_folder, text_file,
                                                          capsys):  # fmt: skip
    out = tmp_path / "mix"
    code, stdout, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64", "--out", str(out),
        "--calib", str(text_file), *CALIB, "--target-bits", "5.5", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["size"]["bits_per_weight"] <= 5.5
    predicted = summary["mixed_precision"]["bits_per_weight"]
    assert predicted == pytest.approx(summary["size"]["bits_per_weight"], abs=1e-5)
    assert summary["recipe"]["overrides"]  # the choice is an ordinary, editable recipe
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["bits_per_weight"] <= 5.5


def test_a_budget_below_the_narrowest_candidates_is_a_clear_error(tmp_path, tiny_folder,
                                                                 text_file, capsys):  # fmt: skip
    code, _, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64", "--out",
        str(tmp_path / "x"), "--calib", str(text_file), *CALIB, "--target-bits", "1.0",
    )  # fmt: skip
    assert code == 2 and "at least 2.500 bits/weight" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_budgets_are_checked_before_the_analysis(tmp_path, tiny_folder, text_file, capsys):
    """A malformed size, or K-means (whose codebooks the candidates' costs leave out), fails
    at once: the analysis it would follow can take hours."""
    base = ["quantize", str(tiny_folder), "--out", str(tmp_path / "x"), "--calib", str(text_file),
            *CALIB]  # fmt: skip
    code, _, err = run(capsys, *base, "--recipe", "w4-rtn-g64", "--target-size", "12XB")
    assert code == 2 and "expected a size like 60MB" in err and "sensitivity" not in err
    code, _, err = run(capsys, *base, "--recipe", "w3-kmeans-channel", "--target-bits", "4.2")
    assert code == 2 and "K-means layers also store a codebook" in err
    assert not (tmp_path / "x").exists()


def test_target_size_counts_the_embedding_a_quantized_tied_head_leaves_in_float(tmp_path,
                                                                               capsys):  # fmt: skip
    """The head becomes its own quantized tensor; the embedding keeps its float table."""
    from helpers import TEXT, make_tokenizer, tiny_llama

    src = tmp_path / "tied"
    tiny_llama(tie=True).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    recipe = tmp_path / "head.yaml"
    recipe.write_text('{"version": 1, "weights": {"bits": 4, "group_size": 32}, "ignore": []}')
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    code, stdout, err = run(
        capsys, "quantize", str(src), "--recipe", str(recipe), "--out", str(tmp_path / "q"),
        "--calib", str(text), *CALIB, "--target-size", "60kB", "--candidates", "2", "4", "8",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["size"]["total_bytes"] <= 60_000


def test_diff_names_the_planted_broken_layer(tmp_path, tiny_folder, text_file, capsys):
    out = tmp_path / "w8"
    code, _, err = run(capsys, "quantize", str(tiny_folder), "--recipe", "w8-rtn",
                       "--out", str(out))  # fmt: skip
    assert code == 0, err
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.0.self_attn.o_proj.scale"] = torch.zeros_like(
        state["model.layers.0.self_attn.o_proj.scale"]
    )
    save_file(state, str(weights))
    text = ("--corpus", str(text_file), "--seqlen", "32", "--tokens", "128")
    code, stdout, err = run(capsys, "diff", str(tiny_folder), str(out), *text, "--json")
    assert code == 0, err
    assert json.loads(stdout)["layers"][0]["layer"] == "model.layers.0.self_attn.o_proj"


def test_diff_refuses_a_folder_in_another_basis(tmp_path, tiny_folder, text_file, capsys):
    """AWQ scales (like a rotation or SmoothQuant factors) are folded into the neighbouring
    weights: swapping one float layer back into such a folder measures nothing."""
    out = tmp_path / "awq"
    code, _, err = run(capsys, "quantize", str(tiny_folder), "--recipe", "w4-awq-g64", "--out",
                       str(out), "--calib", str(text_file), "--calib-samples", "2",
                       "--calib-seqlen", "32")  # fmt: skip
    assert code == 0, err
    text = ("--corpus", str(text_file), "--seqlen", "32", "--tokens", "64")
    code, _, err = run(capsys, "diff", str(tiny_folder), str(out), *text)
    assert code == 2 and "folded AWQ scales into its weights" in err


def test_analyze_prints_a_readable_ranking(tiny_folder, text_file, capsys):
    code, stdout, err = run(capsys, "analyze", str(tiny_folder), "--recipe", "w4-rtn-g64",
                            "--calib", str(text_file), *CALIB, "--candidates", "2", "8",
                            "--top", "3")  # fmt: skip
    assert code == 0, err
    assert "proxy rank correlation" in stdout and "int2 (int2-asym-g64" in stdout
    assert stdout.count("model.layers.") == 6  # top 3 per format


def test_target_bits_keeps_the_rotation_of_a_mixture(tmp_path, text_file, capsys):
    """The *-best presets' rotate block (if_possible) on a mixture of experts: the analysis
    measures the rotated model and the folder's recipe keeps the rotation."""
    import yaml

    from helpers import make_tokenizer, tiny_moe

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    recipe = {"version": 1, "name": "rot", "algorithm": "rtn", "ignore": ["lm_head"],
              "weights": {"bits": 4, "group_size": 32},
              "rotate": {"online": ["down_proj"], "if_possible": True}}  # fmt: skip
    (tmp_path / "rot.yaml").write_text(yaml.safe_dump(recipe))
    code, stdout, err = run(
        capsys, "quantize", str(tmp_path / "src"), "--recipe", str(tmp_path / "rot.yaml"),
        "--out", str(tmp_path / "mix"), "--calib", str(text_file), *CALIB,
        "--target-bits", "6", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["recipe"]["rotate"]["online"] == ["down_proj"]

"""The command line, end to end on a tiny random model and a local text corpus."""

import json

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv] if argv and argv[0] not in ("--help", "--version") else list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def quantized(tmp_path, tiny_folder, text_file, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64", "--out", str(out),
        "--eval", "--eval-corpus", str(text_file), "--eval-seqlen", "64", "--eval-tokens", "256",
    )  # fmt: skip
    assert code == 0
    return out, stdout


def test_quantize_with_eval_prints_the_table_and_saves(quantized):
    out, stdout = quantized
    assert "float" in stdout and "w4-rtn-g64" in stdout and "4.5000" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["metrics"]["eval"]["tokens"] == 256
    assert manifest["metrics"]["eval"]["kl"] > 0


def test_inspect_json_has_top_level_bits_per_weight(quantized, capsys):
    code, stdout, _ = run(capsys, "inspect", str(quantized[0]), "--json")
    assert code == 0
    assert json.loads(stdout)["bits_per_weight"] == 4.5


def test_eval_of_saved_folder_matches_what_quantize_measured(
    quantized, tiny_folder, text_file, capsys
):
    """The reloaded folder runs on the kernels; on windows longer than a decode batch they
    compute with float inputs, so the figures agree up to the order of float sums."""
    out = quantized[0]
    code, stdout, _ = run(
        capsys, "eval", str(out), "--corpus", str(text_file), "--seqlen", "64", "--tokens", "256",
        "--ref", str(tiny_folder), "--json",
    )  # fmt: skip
    assert code == 0
    got = json.loads(stdout)
    assert {"model", "corpus", "seqlen", "tokens", "ppl", "kl", "top1"} <= set(got)
    measured = json.loads((out / "lowbit.json").read_text())["metrics"]["eval"]
    assert got["ppl"] == pytest.approx(measured["ppl"], rel=1e-5)
    assert got["kl"] == pytest.approx(measured["kl"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "./missing-model", "--recipe", "w4-rtn-g64"], "no such file or folder"),
        (["quantize", "{tiny}", "--recipe", "w9-rtn"], "unknown recipe"),
        (["quantize", "{tiny}", "--recipe", "w4-rtn-g128"], "group_size 128 does not divide"),
        (["quantize", "{tiny}", "--recipe", "{bad_yaml}"], "unknown key 'bitz'"),
        (["eval", "{tiny}", "--corpus", "no-such-corpus", "--seqlen", "32"], "unknown corpus"),
        (["quantize", "{gguf}", "--recipe", "w4-rtn-g64"], "could not read GGUF"),
        (["eval", "{tiny}", "--kv-hadamard"], "need --kv-bits or --query-bits"),
        (["eval", "{tiny}", "--kv-bits", "4", "--kv-center"], "needs key centres measured"),
        (["eval", "{tiny}", "--kv-bits", "16", "--kv-hadamard"], "kv_bits 16 stores float16"),
        (
            ["quantize", "{tiny}", "--recipe", "w4-rtn-g64", "--kv-bits", "4", "--kv-group", "7"],
            "does not divide the head",
        ),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_no_output(
    argv, message, tmp_path, tiny_folder, capsys
):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("version: 1\nweights: {bitz: 4}\n")
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf at all")
    subs = {"{tiny}": str(tiny_folder), "{bad_yaml}": str(bad_yaml), "{gguf}": str(gguf)}
    argv = [subs.get(a, a) for a in argv]
    out = tmp_path / "out"
    if argv[0] == "quantize":
        argv += ["--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("lowbit: error:")
    assert not out.exists()


def test_existing_output_needs_overwrite(quantized, tiny_folder, capsys):
    code, _, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w8-rtn", "--out", str(quantized[0])
    )
    assert code == 2 and "--overwrite" in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out
    for command in ("quantize", "eval", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: lowbit " + command in capsys.readouterr().out


def test_presets_listing_and_yaml(capsys):
    assert run(capsys, "presets")[1].count("\n") >= 8
    code, out, _ = run(capsys, "presets", "w4-rtn-g64")
    assert code == 0 and "group_size: 64" in out


def test_calibrated_quantize_records_calibration_and_refuses_overlapping_eval(
    tmp_path, tiny_folder, text_file, capsys
):
    out = tmp_path / "gptq"
    code, stdout, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-gptq-g64", "--out", str(out),
        "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert (
        summary["calibration"]["tokens"] == 128
        and len(summary["calibration"]["token_sha256"]) == 64
    )
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["calibration"] == summary["calibration"]
    assert len(manifest["blocks"]) == 2
    code, _, err = run(capsys, "eval", str(out), "--corpus", str(text_file), "--seqlen", "32")
    assert code == 2 and "calibrated on" in err
    copy = tmp_path / "same-text.txt"  # another name for the same text: still refused
    copy.write_text(text_file.read_text())
    code, _, err = run(capsys, "eval", str(out), "--corpus", str(copy), "--seqlen", "32")
    assert code == 2 and "calibrated on this text" in err
    calibrated = text_file.read_text()  # the same name, another text (the name decided)
    text_file.write_text(" ".join(reversed(calibrated.split())))
    code, _, err = run(capsys, "eval", str(out), "--corpus", str(text_file), "--seqlen", "32")
    assert code == 0, err
    text_file.write_text(calibrated)
    code, _, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-gptq-g64", "--out",
        str(tmp_path / "g2"), "--calib", str(text_file), "--eval", "--eval-corpus", str(copy),
        "--eval-seqlen", "32", "--eval-tokens", "64",
    )  # fmt: skip
    assert code == 2 and "the same text" in err


def test_calibration_corpus_too_short_is_a_clear_error(tmp_path, tiny_folder, text_file, capsys):
    out = str(tmp_path / "q")
    code, _, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-gptq-g64", "--out", out,
        "--calib", str(text_file), "--calib-samples", "1000", "--calib-seqlen", "128",
    )  # fmt: skip
    assert code == 2 and "lower --calib-samples" in err
    assert not (tmp_path / "q").exists()
    # windows longer than the tiny model's 256 positions
    code, _, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", "w4-gptq-g64", "--out", out,
        "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "512",
    )  # fmt: skip
    assert code == 2 and "--calib-seqlen 512 exceeds the model's context of 256" in err


LKD_YAML = """version: 1
algorithm: rtn
weights: {bits: 4, group_size: 32}
activations: {bits: 8, granularity: token, dynamic: true}
lkd: {steps: 4, lr: 1.0e-4}
"""


@pytest.mark.parametrize("preset", ["w8a8-static", "lkd.yaml"])
def test_activation_recipes_quantize_and_save(tmp_path, tiny_folder, text_file, capsys, preset):
    out = tmp_path / "q"
    if preset.endswith(".yaml"):
        (tmp_path / preset).write_text(LKD_YAML)
        preset = str(tmp_path / preset)
    code, stdout, err = run(
        capsys, "quantize", str(tiny_folder), "--recipe", preset, "--out", str(out),
        "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32", "--json",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "lowbit.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["activations"]["bits"] == 8
    assert manifest["smoothquant_alpha"] if preset == "w8a8-static" else manifest["lkd"]
    assert json.loads(stdout)["out"]
    code, stdout, err = run(capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout), err


def test_kv_cache_flags_round_the_cache_and_quantize_saves_them(tiny_folder, text_file,
                                                                tmp_path, capsys):  # fmt: skip
    """--kv-bits at eval changes the figures; at quantize it lands in the folder's recipe, and
    the folder evaluates as eval --kv-bits does on the same weights."""
    window = ["--corpus", str(text_file), "--seqlen", "64", "--tokens", "256", "--json"]
    ppl = {}
    for extra in ([], ["--kv-bits", "2", "--kv-hadamard"]):
        code, stdout, _ = run(capsys, "eval", str(tiny_folder), *window, *extra)
        assert code == 0
        ppl[len(extra)] = json.loads(stdout)["ppl"]
    assert ppl[0] != ppl[3]
    code, stdout, _ = run(capsys, "eval", str(tiny_folder), *window, "--kv-bits", "4", "--ref",
                          str(tiny_folder))  # fmt: skip
    got = json.loads(stdout)  # the reference is the model without the flag: its own figures
    assert code == 0 and got["ref_ppl"] == pytest.approx(ppl[0], rel=1e-6) and got["kl"] > 0
    out = tmp_path / "kv"
    code, _, _ = run(capsys, "quantize", str(tiny_folder), "--recipe", "kv4", "--kv-bits", "2",
                     "--kv-hadamard", "--out", str(out))  # fmt: skip
    assert code == 0
    recipe = json.loads((out / "lowbit.json").read_text())["recipe"]
    assert recipe["attention"]["kv_bits"] == 2 and recipe["weights"] is None
    code, stdout, _ = run(capsys, "eval", str(out), *window)
    assert json.loads(stdout)["ppl"] == pytest.approx(ppl[3], rel=1e-5)


def test_rotate_learned_trains_on_the_calibration_text(tmp_path, tiny_folder, text_file, capsys):
    def quantize(out, recipe, rotate, samples):
        code, _, err = run(
            capsys, "quantize", str(tiny_folder), "--recipe", recipe, "--rotate", rotate,
            "--out", str(out), "--calib", str(text_file), "--calib-samples", str(samples),
            "--calib-seqlen", "32",
        )  # fmt: skip
        assert code == 0, err
        return json.loads((out / "lowbit.json").read_text())

    manifest = quantize(tmp_path / "spin", "w4-rtn-g64", "learned", 4)
    assert manifest["recipe"]["rotate"]["kind"] == "learned"
    assert manifest["calibration"]["tokens"] == 128  # an RTN recipe read --calib for it
    # --rotate on a preset whose rotation is if_possible: asked for
    rotate = quantize(tmp_path / "asked", "w4-g64-best", "hadamard", 6)["recipe"]["rotate"]
    assert rotate["kind"] == "hadamard" and rotate["if_possible"] is False
    with pytest.raises(SystemExit):  # argparse: usage and the choices, exit 2
        main(["quantize", str(tiny_folder), "--recipe", "w4-rtn-g64", "--rotate", "spin",
              "--out", str(tmp_path / "x")])  # fmt: skip
    assert "invalid choice: 'spin'" in capsys.readouterr().err


def test_the_quantized_row_is_never_named_as_the_float_reference():
    """A recipe named "float" (or a file float.yaml) must not replace --eval's reference row."""
    import argparse

    from lowbit.cli import row_name
    from lowbit.recipes import Recipe

    args = argparse.Namespace(recipe="recipes/float.yaml")
    assert row_name(args, Recipe()) == "float (quantized)"
    assert row_name(args, Recipe(name="float")) == "float (quantized)"
    assert row_name(args, Recipe(name="w4")) == "w4"


def test_an_ascii_locale_reads_and_writes_the_folders_as_utf8(tmp_path, tiny_folder, text_file):
    """Python under a non-UTF-8 locale (LC_ALL=C without its UTF-8 coercion: ASCII) reads and
    writes text in that encoding unless told otherwise: a config with non-ASCII text, as
    checkpoints from the hub have, must quantize, export and report all the same."""
    import os
    import subprocess
    import sys

    config = json.loads((tiny_folder / "config.json").read_text(encoding="utf-8"))
    config["model_card_note"] = "modèle → ×4"
    (tiny_folder / "config.json").write_text(json.dumps(config, ensure_ascii=False),
                                             encoding="utf-8")  # fmt: skip
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    lowbit = [sys.executable, "-X", "utf8=0", "-m", "lowbit", "-q"]
    check = [sys.executable, "-X", "utf8=0", "-c",
             "import locale; print(locale.getpreferredencoding(False))"]  # fmt: skip
    encoding = subprocess.run(check, env=env, capture_output=True, text=True).stdout
    assert "utf" not in encoding.lower(), encoding  # (the locale this test is about)
    out = tmp_path / "q"
    for args in (["quantize", str(tiny_folder), "--recipe", "w4-sym-g32", "--out", str(out)],
                 ["export", str(out), "--format", "compressed-tensors", "--out",
                  str(tmp_path / "ct")],
                 ["report", str(tiny_folder), "--variants", "w4-rtn-g64", "--out",
                  str(tmp_path / "r"), "--corpus", str(text_file), "--seqlen", "32", "--tokens",
                  "64", "--no-rss", "--prompt-tokens", "8", "--new-tokens", "3", "--repeats",
                  "1"]):  # fmt: skip
        done = subprocess.run([*lowbit, *args], env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    exported = json.loads((tmp_path / "ct" / "config.json").read_text(encoding="utf-8"))
    assert exported["model_card_note"] == "modèle → ×4"
    assert "×" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")

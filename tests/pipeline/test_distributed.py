"""Data-parallel quantization: 2 gloo processes give the model 1 process gives.

One torchrun job quantizes a tiny folder with every kind of recipe step (data-free, Hessian,
K-means, AWQ search, SmoothQuant with static ranges, LoRC, LKD, AutoRound, key centres of a
4-bit cache, a learned rotation, end-to-end tuning); the same recipes
then run in this process. Weights must be byte-identical except LKD's and AutoRound's, which
step on the mean gradient of both ranks' batches (as DistributedDataParallel does) and so train
differently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import api

WORKER = Path(__file__).parents[1] / "dist" / "worker.py"
RECIPES = ["w4-rtn-g64", "w4-hqq-g64", "w3-gptq-g32", "w3-kmeans-channel", "w4-awq-g64",
           "w4-awq-gptq-mse-g64", "w8a8-static", "w3-gptq-g64-lorc8", "w4a8-gptq-lkd",
           "w4-autoround-g64", "kv4"]  # fmt: skip
TRAINED = ("w4a8-gptq-lkd", "w4-autoround-g64")  # step on the mean gradient of both ranks


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def single_thread():
    """Both sides compute with one thread (LAPACK's SVD, used by LoRC, depends on the count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_processes_quantize_as_one_does(tiny_folder, tmp_path, single_thread):
    sys.path.insert(0, str(WORKER.parent))
    import worker

    recipes = {}
    for name in RECIPES:
        body = api.load_recipe(name).to_dict()
        if body.get("lkd"):
            body["lkd"]["steps"] = 8
        if body.get("autoround"):
            body["autoround"] = {"iters": 16, "batch_size": 2}
        if body.get("attention"):  # heads of 16 channels
            body["attention"]["group_size"] = 8
        recipes[name] = body
    spin = api.load_recipe("w4-g64-best").to_dict()  # rank 0 learns the rotation for all
    spin["rotate"] |= {"kind": "learned", "steps": 4}
    spin["tune"] = {"steps": 4, "batch_size": 2, "holdout": 2}  # rank 0 tunes the folder
    recipes["w4-g64-spin"] = spin
    spec = tmp_path / "recipes.json"
    spec.write_text(json.dumps(recipes))
    done = torchrun(str(WORKER), str(tiny_folder), str(tmp_path / "two"), str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    one = worker.run(tiny_folder, tmp_path / "one", recipes)
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    memory = [(tmp_path / side / "memory" / "model.safetensors").read_bytes()
              for side in ("one", "two")]  # fmt: skip
    assert memory[0] == memory[1]  # lowbit.quantize inside a process group
    for name in recipes:
        a, b = (tmp_path / side / name for side in ("one", "two"))
        same = (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        manifest = json.loads((b / "lowbit.json").read_text())
        assert manifest["processes"]["world_size"] == 2
        assert len(manifest["processes"]["peak_rss_mb"]) == 2
        if name in TRAINED:  # different training, same ballpark
            assert not same
            assert two[name][0] == pytest.approx(one[name][0], rel=0.05)
        else:
            assert same, name
            assert two[name] == one[name], name  # the scores, gathered over ranks, too
        blocks = [b["output_rel_mse"] for b in manifest["blocks"]]
        mine = [b["output_rel_mse"] for b in json.loads((a / "lowbit.json").read_text())["blocks"]]
        if name not in TRAINED:
            assert blocks == mine  # block errors are summed in batch order on every rank


@pytest.mark.slow  # ~60 s; CI keeps the dense two-process test above
def test_two_processes_quantize_a_mixture_of_experts_as_one_does(tmp_path, single_thread):
    """64 experts, one per token: the ranks' batches reach different experts (some none), and
    their wiring, statistics and folds must still agree to the byte; LKD and AutoRound, which
    average the ranks' gradients, must not stall on an expert one rank did not reach."""
    import transformers as tf

    from helpers import make_tokenizer

    sys.path.insert(0, str(WORKER.parent))
    import worker

    config = tf.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=64, num_experts_per_tok=1)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "mixtral"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    recipes = {n: api.load_recipe(n).to_dict() for n in ("w4-awq-gptq-g64", *TRAINED)}
    recipes["w4a8-gptq-lkd"]["lkd"]["steps"] = 6  # trained: each rank's experts' gradients,
    recipes["w4-autoround-g64"]["autoround"] = {"iters": 6, "batch_size": 2}  # zeros if none
    spec = tmp_path / "recipes.json"
    spec.write_text(json.dumps(recipes))
    done = torchrun(str(WORKER), str(folder), str(tmp_path / "two"), str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    worker.run(folder, tmp_path / "one", recipes)
    for name in ["w4-awq-gptq-g64", "memory"]:
        one, two = (tmp_path / side / name / "model.safetensors" for side in ("one", "two"))
        assert one.read_bytes() == two.read_bytes(), name

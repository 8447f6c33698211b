"""QAT end to end on a tiny model: the loss falls, packing is exact, the CLI saves a folder."""

import copy
import json

import pytest
import torch

from helpers import make_recipe
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.nn import QuantLinear
from lowbit.nn.fake_linear import FakeQuantLinear
from lowbit.pipeline.qat import QATOptions, _loss, fake_quantize_model, pack_model
from lowbit.recipes import Recipe


def windows(n, seqlen=24, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(
        "random", n, seqlen, seed, torch.randint(0, vocab, (n, seqlen), generator=g)
    )


def test_training_lowers_the_distillation_loss(tiny_model):
    teacher = copy.deepcopy(tiny_model)
    rec = make_recipe({"bits": 2, "group_size": 32})  # random tiny models: 2 bits to see damage
    ids = windows(1, seed=1).windows  # a held-out window
    student = copy.deepcopy(tiny_model)
    fake_quantize_model(student, rec)
    with torch.no_grad():
        before = _loss(student, teacher, ids, "kl").item()
    report = api.qat(tiny_model, rec, windows(40), QATOptions(steps=40, lr=1e-4, batch_size=1),
                     progress=False)  # fmt: skip
    assert report.qat["last_loss"] < 0.8 * report.qat["first_loss"]
    with torch.no_grad():
        after = _loss(tiny_model, teacher, ids, "kl").item()
    assert after < before
    assert all(isinstance(tiny_model.get_submodule(n), QuantLinear) for n in report.layers)


def test_packed_model_matches_the_fake_quant_model_exactly(tiny_model):
    fakes = fake_quantize_model(tiny_model, make_recipe({"bits": 3, "group_size": 32}))
    assert all(isinstance(f, FakeQuantLinear) for f in fakes.values())
    with torch.no_grad():
        for fake in fakes.values():
            fake.weight.add_(0.02 * torch.randn_like(fake.weight))
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        fake_logits = tiny_model(x).logits
        pack_model(tiny_model, fakes, make_recipe({"bits": 3, "group_size": 32}))
        assert torch.equal(tiny_model(x).logits, fake_logits)


def test_weights_a_last_step_sent_past_float32_are_not_packed(tiny_model):
    """The last update is checked by no later loss: a huge (finite) learned scale became inf
    in its 16-bit stored form, a saved folder and exit 0; packing refuses it, and a learning
    rate past 1 is refused."""
    rec = make_recipe({"bits": 4, "group_size": 32})
    fakes = fake_quantize_model(tiny_model, rec)
    name, fake = next(iter(fakes.items()))
    with torch.no_grad():
        fake.scale.view(-1)[0] = 1e30  # float32 holds it, the stored float16 does not
        with pytest.raises(LowbitError, match=f"qat: {name}'s trained weights or scales"):
            pack_model(tiny_model, fakes, rec)
    for lr in (1e30, float("inf"), float("nan"), 0.0):
        with pytest.raises(LowbitError, match=r"lr in \(0, 1\]"):
            QATOptions(lr=lr)


def test_calibrated_recipes_and_short_training_text_are_clear_errors(tiny_model):
    rec = api.load_recipe("w4-gptq-g64")
    with pytest.raises(LowbitError, match="RTN weight-only recipe"):
        api.qat(tiny_model, rec, windows(4), QATOptions(steps=2), progress=False)
    with pytest.raises(LowbitError, match="needs 10 training windows"):
        api.qat(tiny_model, "w3-rtn-g32", windows(4), QATOptions(steps=5), progress=False)
    with pytest.raises(LowbitError, match="does not run the recipe's attention: step"):
        api.qat(tiny_model, "kv8", windows(4), QATOptions(steps=2), progress=False)
    nothing = Recipe.from_dict({"version": 1, "weights": None})
    with pytest.raises(LowbitError, match="leaves every layer in float"):
        api.qat(tiny_model, nothing, windows(4), QATOptions(steps=2), progress=False)
    lkd = make_recipe({"bits": 3, "group_size": 32}).to_dict() | {"lkd": {}}
    with pytest.raises(LowbitError, match="does not run the recipe's lkd: step"):
        api.qat(tiny_model, Recipe.from_dict(lkd), windows(4), QATOptions(steps=2),
                progress=False)  # fmt: skip


def test_cli_trains_saves_and_refuses_training_text_for_evaluation(
    tiny_folder, text_file, tmp_path, capsys
):
    out = tmp_path / "q"
    argv = ["-q", "qat", str(tiny_folder), "--recipe", "w3-rtn-g32", "--train", str(text_file),
            "--steps", "3", "--seqlen", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["qat"]["steps"] == 3 and manifest["calibration"]["samples"] == 6
    assert manifest["canary"]["windows"] > 0  # recorded as quantize records it: monitor checks it
    assert main(["-q", "monitor", str(out)]) == 0
    assert main([*argv[:-1], str(tmp_path / "r"), "--eval", "--eval-corpus", str(text_file)]) == 2
    assert "must differ" in capsys.readouterr().err


def test_training_inside_a_callers_no_grad_block(tiny_model):
    """A caller's ``torch.no_grad()`` (an evaluation script's) does not stop the training."""
    with torch.no_grad():
        report = api.qat(tiny_model, make_recipe({"bits": 2, "group_size": 32}), windows(4),
                         QATOptions(steps=4, lr=1e-4, batch_size=1), progress=False)  # fmt: skip
    assert report.qat["last_loss"] > 0


def test_a_model_with_dropout_trains_without_it():
    """The teacher is in eval mode: a student with dropout on would chase noise (at 8 bits the
    first step's KL was ~1e-3 with GPT-2's dropout of 0.1, ~1e-7 without)."""
    from helpers import tiny_family_model

    model = tiny_family_model("gpt2")
    assert model.config.resid_pdrop > 0
    rec = make_recipe({"bits": 8, "group_size": -1, "symmetric": True})
    report = api.qat(model, rec, windows(2, vocab=64), QATOptions(steps=2, lr=1e-6, batch_size=1),
                     progress=False)  # fmt: skip
    assert report.qat["first_loss"] < 1e-4

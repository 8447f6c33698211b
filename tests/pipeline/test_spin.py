"""SpinQuant's learned rotation: trained on calibration text, exactly orthogonal, deterministic,
folded without changing the float model, better for the quantized model than its Hadamard
start, the same streamed as in memory, and kept for a resumed run."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import rel, tiny_llama
from lowbit import api
from lowbit.algorithms.rotate import RotateOptions, orthogonal
from lowbit.calibration import CalibrationSet
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.models.rotate import Rotator, rotate_model
from lowbit.models.source import TensorSource
from lowbit.models.workdir import WorkFolder
from lowbit.pipeline import spin
from lowbit.recipes import Recipe


def _model():
    model = tiny_llama(vocab=64, hidden=64)
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # folded scales that are not all 1
            p.data = 1 + 0.5 * torch.rand(p.shape, generator=g)
    return model


def _calib(vocab=64):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet("random", 8, 32, 0, torch.randint(0, vocab, (8, 32), generator=g))


def _recipe(kind="learned", steps=30, acts=4, heads=True):
    data = {"version": 1, "algorithm": "rtn", "ignore": ["lm_head"],
            "weights": {"bits": 3, "group_size": 32},
            "rotate": {"kind": kind, "steps": steps, "online": ["down_proj"],
                       "learn_heads": heads and kind == "learned"}}  # fmt: skip
    if acts:
        data["activations"] = {"bits": acts, "granularity": "token", "dynamic": True}
    return Recipe.from_dict(data)


def test_the_learned_matrices_are_orthogonal_seeded_and_fold_without_changing_the_model():
    """R1 (the stream's Q) and R2 (one head matrix per block) are trained together."""
    model, calib = _model(), _calib()
    q1, h1, losses = spin.learn_rotation(copy.deepcopy(model), _recipe(steps=5), calib, False)
    q2, h2, _ = spin.learn_rotation(copy.deepcopy(model), _recipe(steps=5), calib, False)
    assert torch.equal(q1, q2) and torch.equal(h1, h2) and len(losses) == 5
    assert torch.allclose(q1 @ q1.T, torch.eye(64, dtype=torch.float64), atol=1e-10)
    d = model.config.hidden_size // model.config.num_attention_heads
    assert h1.shape == (model.config.num_hidden_layers, d, d)
    eye = torch.eye(d, dtype=torch.float64).expand_as(h1)
    assert torch.allclose(h1 @ h1.transpose(1, 2), eye, atol=1e-10)
    start = orthogonal(64, _recipe().rotate)
    assert (q1 - start).abs().max() > 1e-3  # it moved
    moved = (h1 - orthogonal(d, _recipe().rotate)).abs().amax(dim=(1, 2))
    assert (moved > 1e-4).all() and (h1[0] - h1[1]).abs().max() > 1e-4  # each block its own
    with torch.no_grad():
        before = model(calib.windows).logits
        rotate_model(model, _recipe().rotate, q1, h1)
        assert rel(model(calib.windows).logits, before) < 1e-5


@pytest.mark.parametrize("change", [{"heads": False, "learn_heads": False}, {"learn_heads": False}])
def test_the_stream_matrix_can_be_learned_alone(change):
    """Without head rotations, or with ``learn_heads: false`` (the default: the heads keep the
    Hadamard matrix), only Q is trained, and the model still folds exactly."""
    assert not RotateOptions(kind="learned").learn_heads
    recipe = _recipe(steps=2)
    recipe = dataclasses.replace(recipe, rotate=dataclasses.replace(recipe.rotate, **change))
    model, calib = _model(), _calib()
    q, heads, _ = spin.learn_rotation(copy.deepcopy(model), recipe, calib, False)
    assert heads is None and q.shape == (64, 64)
    with torch.no_grad():
        before = model(calib.windows).logits
        rotate_model(model, recipe.rotate, q)
        assert rel(model(calib.windows).logits, before) < 1e-5
    if "heads" in change:
        with pytest.raises(LowbitError, match="heads: true"):
            eye = torch.eye(16, dtype=torch.float64).expand(2, 16, 16)
            Rotator(_model(), recipe.rotate, q, eye)


@pytest.mark.parametrize("options", [{"kind": "hadamard"}, {"kind": "learned", "heads": False}])
def test_learn_heads_without_learned_head_matrices_is_an_error(options):
    with pytest.raises(LowbitError, match="learn_heads"):
        RotateOptions(learn_heads=True, **options)


def test_a_learned_rotation_rounds_better_than_its_hadamard_start():
    """W3 g32 weights and 4-bit per-token inputs, round to nearest: the quantized model's KL
    to the float one on the calibration windows drops (measured 0.00137 -> 0.00115)."""
    model, calib = _model(), _calib()
    with torch.no_grad():
        ref = F.log_softmax(model(calib.windows).logits, -1)
    kl = {}
    for kind in ("hadamard", "learned"):
        m = copy.deepcopy(model)
        api.quantize(m, _recipe(kind), calib, progress=False)
        with torch.no_grad():
            logp = F.log_softmax(m(calib.windows).logits, -1)
        kl[kind] = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1).mean().item()
    assert kl["learned"] < 0.95 * kl["hadamard"]


def test_learning_needs_calibration_text_and_the_folding_needs_the_matrix():
    assert _recipe().needs_calibration
    with pytest.raises(LowbitError, match="calibration text"):
        api.quantize(_model(), _recipe(), None, progress=False)
    with pytest.raises(LowbitError, match="trained matrix"):
        Rotator(_model(), RotateOptions(kind="learned")).q  # noqa: B018 - the folding's
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match="trained matrix"):
        rotate_model(model, RotateOptions(kind="learned"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_streamed_learning_equals_learning_in_memory(tiny_folder, tmp_path):
    src = api.load_model(str(tiny_folder))
    calib = _calib(src.model.config.vocab_size)
    recipe = _recipe(steps=4, acts=None)
    out, _ = api.quantize_to(str(tiny_folder), recipe, tmp_path / "s", calib, progress=False)
    api.quantize(src.model, recipe, calib, progress=False)
    ids = calib.windows[:2]
    with torch.no_grad():
        assert rel(api.load(out, kernels=False).model(ids).logits, src.model(ids).logits) < 1e-5


def test_a_resumed_run_folds_the_kept_matrix_without_training(tiny_folder, tmp_path, monkeypatch):
    calib = _calib()
    work = WorkFolder(tmp_path / "out", {"run": 1})
    kept = orthogonal(64, RotateOptions(kind="random", seed=5))
    work.store(spin.KEPT, {"q": kept})

    def train(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(spin, "learn_rotation", train)
    got = spin.streamed_matrix(tiny_folder, TensorSource(tiny_folder), _recipe(), calib, work,
                               Group(), progress=False)  # fmt: skip
    assert torch.equal(got[0], kept) and got[1] is None  # kept without head matrices: shared


def test_the_estimate_bounds_the_training_memory(tiny_folder):
    rtn = dataclasses.replace(_recipe(acts=None), rotate=RotateOptions(online=("down_proj",)))
    calib = _calib(vocab=50)  # the tiny folder's tokenizer
    plain = api.estimate(str(tiny_folder), rtn, calib, progress=False, canary=False)
    learned = api.estimate(str(tiny_folder), _recipe(acts=None), calib, progress=False,
                           canary=False)  # fmt: skip
    assert learned["learned_rotation"] and not plain["learned_rotation"]
    assert (
        learned["peak_rss_mb"]
        >= learned["probe"]["baseline_mb"] + 6 * learned["params"] * 4 / 2**20 - 1e-6
    )


def test_learning_inside_a_callers_no_grad_block():
    """A caller's ``torch.no_grad()`` (an evaluation script's) does not stop the training."""
    model, calib = _model(), _calib()
    with torch.no_grad():
        q, _, losses = spin.learn_rotation(model, _recipe(steps=2), calib, False)
    assert len(losses) == 2 and (q - orthogonal(64, _recipe().rotate)).abs().max() > 1e-6


def test_learning_with_nothing_rounded_says_the_matrix_cannot_move(caplog):
    data = {"version": 1, "weights": None, "attention": {"kv_bits": 4},
            "rotate": {"kind": "learned", "steps": 1}}  # fmt: skip
    with caplog.at_level("WARNING"):
        spin.learn_rotation(_model(), Recipe.from_dict(data), _calib(), False)
    assert "rounds no weights or activations" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        spin.learn_rotation(_model(), _recipe(steps=1), _calib(), False)
    assert "rounds no weights" not in caplog.text

import math

import pytest
import torch
from torch import nn

from lowbit.eval import score_models


class Fixed(nn.Module):
    """Returns the same logits for every position: ppl and KL have closed forms."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, ids, use_cache=False):
        return self.row.expand(ids.shape[0], ids.shape[1], -1)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    windows = torch.randint(0, 50, (3, 17))
    scores, _ = score_models({"u": Fixed(torch.zeros(50))}, windows, progress=False)
    assert scores["u"].ppl == pytest.approx(50.0, rel=1e-6)
    assert scores["u"].count == 3 * 16


def test_kl_and_top1_against_a_reference():
    p = torch.tensor([2.0, 1.0, 0.0])
    q = torch.tensor([0.0, 1.0, 2.0])
    ref, other = Fixed(p), Fixed(q)
    windows = torch.randint(0, 3, (2, 9))
    scores, _ = score_models({"ref": ref, "q": other}, windows, ref=ref, progress=False)
    lp, lq = torch.log_softmax(p, 0), torch.log_softmax(q, 0)
    expected = (lp.exp() * (lp - lq)).sum().item()
    assert scores["q"].mean_kl == pytest.approx(expected, rel=1e-5)
    assert scores["q"].top1_rate == 0.0
    assert scores["ref"].mean_kl == 0.0 and scores["ref"].top1_rate == 1.0


def test_nll_matches_cross_entropy_of_a_real_model(tiny_model):
    windows = torch.randint(0, 50, (2, 24))
    scores, _ = score_models({"m": tiny_model}, windows, progress=False)
    with torch.no_grad():
        logits = tiny_model(windows).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    assert scores["m"].ppl == pytest.approx(math.exp(ce.item()), rel=1e-4)


def test_a_reference_with_another_vocabulary_is_one_line():
    from helpers import tiny_llama
    from lowbit.analysis.kl import mean_kl, reference_logprobs
    from lowbit.errors import LowbitError

    model, ref = tiny_llama(vocab=64), tiny_llama(vocab=96)
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match="scores 64 tokens and the reference 96"):
        score_models({"q": model}, windows, ref=ref, progress=False)
    with pytest.raises(LowbitError, match="do not share a vocabulary"):
        mean_kl(model, windows, reference_logprobs(ref, windows))


def test_a_broken_models_figures_are_inf_and_nan_not_a_crash():
    from lowbit.eval.perplexity import Scores

    assert Scores(nll=800.0 * 10, count=10).ppl == math.inf  # exp(800) overflows a float
    assert Scores(kl=-2e-9, count=10).mean_kl == 0.0  # rounding below 0: identical models
    assert math.isnan(Scores(kl=math.nan, count=10).mean_kl)  # NaN stays NaN
    windows = torch.randint(0, 3, (2, 9))
    huge = Fixed(torch.tensor([0.0, -3000.0, 3000.0]))  # every target but one ~6000 nats off
    scores, _ = score_models({"h": huge}, windows, progress=True)
    assert scores["h"].ppl == math.inf


def test_each_model_has_its_own_seconds_and_small_kl_keeps_its_digits():
    from lowbit.eval.perplexity import EvalResult

    ref, other = Fixed(torch.zeros(3)), Fixed(torch.tensor([0.0, 0.0, 1e-3]))
    windows = torch.randint(0, 3, (2, 9))
    _, seconds = score_models({"ref": ref, "q": other}, windows, ref=ref, progress=False)
    assert set(seconds) == {"ref", "q"} and all(s > 0 for s in seconds.values())
    result = EvalResult("q", "c", "x", 9, 2, 18, 16, 3.0, 5.4312e-7, 1.0, 0.5)
    assert result.to_dict()["kl"] == 5.4312e-7  # not rounded to 1e-06

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

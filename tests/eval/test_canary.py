"""Canary prompts: the top-k + rest KL, the stored file, and the recorded tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer
from lowbit.errors import LowbitError
from lowbit.eval.canary import FILE, Canary, canary_tokens, check, tolerance


def _canary(vocab: int = 50, k: int = 8) -> tuple[Canary, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 6), generator=g)
    logits = 3 * torch.randn(2, 6, vocab, generator=g)
    return Canary.from_logits(tokens, logits, k), logits


def test_the_model_itself_scores_zero_and_noise_scores_more():
    canary, logits = _canary()
    kl, top1 = canary.score(logits)
    assert kl == pytest.approx(0, abs=1e-6) and top1 == 1.0
    noisy = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    kl_noisy, _ = canary.score(noisy)
    assert kl_noisy > 1e-3


def test_top_k_kl_is_a_lower_bound_of_the_full_kl_and_tight_at_full_k():
    canary, logits = _canary(k=8)
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    p, q = F.log_softmax(logits, -1), F.log_softmax(other, -1)
    full = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < canary.score(other)[0] <= full + 1e-6
    everything = Canary.from_logits(canary.tokens, logits, k=50)
    assert everything.score(other)[0] == pytest.approx(full, rel=1e-4)


def test_file_roundtrip_and_damage_is_named(tmp_path):
    canary, logits = _canary()
    sha = canary.save(tmp_path / FILE)
    back = Canary.load(tmp_path / FILE)
    assert torch.equal(back.top_ids, canary.top_ids) and torch.equal(back.tokens, canary.tokens)
    manifest = {"canary": {"file": FILE, "sha256": sha, "tolerance": 0.01, "kl": 0.0}}

    def model(input_ids, use_cache):  # the logits above, window by window
        return logits[:1] if torch.equal(input_ids[0], canary.tokens[0]) else logits[1:]

    assert check(model, tmp_path, manifest).ok
    (tmp_path / FILE).write_bytes(b"garbage")
    with pytest.raises(LowbitError, match="does not match the sha256"):
        check(model, tmp_path, manifest)
    with pytest.raises(LowbitError, match="records no canary"):
        check(model, tmp_path, {})
    with pytest.raises(LowbitError, match="not a lowbit canary file"):
        Canary.load(tmp_path / FILE)


def test_tokens_text_then_random_and_within_the_vocabulary():
    tok = make_tokenizer()
    tokens = canary_tokens(tok, len(tok), context=16)
    assert tokens.shape == (4, 16) and int(tokens.max()) < len(tok)
    assert torch.equal(tokens, canary_tokens(tok, len(tok), context=16))  # fixed
    assert canary_tokens(None, 10, context=8).shape == (4, 8)
    assert tolerance(0.0) > 0 and tolerance(0.01) > 0.01

"""The decode loop: the tokens transformers' generate gives, batches, stops, sampling, errors."""

import pytest
import torch

from helpers import tiny_family_model, tiny_llama
from lowbit.errors import LowbitError
from lowbit.runtime import Runtime, Sampling
from lowbit.runtime.sampling import next_tokens


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gemma"])
def test_greedy_tokens_equal_transformers_generate(family):
    """Compact (llama, qwen3) and model's-own (gpt2, gemma) paths decode what generate does."""
    model = tiny_family_model(family)
    run = Runtime(model).generate([[3, 1, 4, 1, 5, 9, 2, 6]], 24)
    assert run.path == ("compact" if family in ("llama", "qwen3") else "hf")
    assert run.tokens[0] == hf_greedy(model, [3, 1, 4, 1, 5, 9, 2, 6], 24)
    assert run.finish == ["length"] and run.steps == 23


def test_batch_rows_equal_rows_alone_and_stop_tokens():
    model = tiny_llama(vocab=64)
    rt = Runtime(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    alone = [rt.generate([p], 12).tokens[0] for p in prompts]
    both = rt.generate(prompts, 12)
    assert both.tokens == alone
    stop = alone[0][4]  # the fifth token of row 0 ends that row (and is not kept)
    run = rt.generate(prompts, 12, stop_ids=[stop])
    assert run.tokens[0] == alone[0][: alone[0].index(stop)] and run.finish[0] == "stop"


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    rt = Runtime(tiny_llama(vocab=64))
    prompt = [[3, 1, 4]]
    hot = Sampling(temperature=1.5, top_p=0.9, seed=7)
    assert rt.generate(prompt, 16, hot).tokens == rt.generate(prompt, 16, hot).tokens
    other = Sampling(temperature=1.5, top_p=0.9, seed=8)
    assert rt.generate(prompt, 16, hot).tokens != rt.generate(prompt, 16, other).tokens
    greedy = rt.generate(prompt, 16).tokens
    assert rt.generate(prompt, 16, Sampling(temperature=1.0, top_k=1, seed=3)).tokens == greedy
    assert rt.generate(prompt, 16, Sampling(temperature=1.0, top_p=1e-6, seed=3)).tokens == greedy


def test_streaming_callback_sees_each_token_and_can_cancel():
    rt = Runtime(tiny_llama(vocab=64))
    seen = []
    run = rt.generate([[1, 2]], 10, on_tokens=lambda new: seen.append(new[0]))
    assert seen == run.tokens[0]
    stopped = rt.generate([[1, 2]], 10, on_tokens=lambda new: len(seen) < 13 and not seen.append(0))
    assert stopped.finish == ["cancelled"] and len(stopped.tokens[0]) < 10


@pytest.mark.parametrize("prompts,n,match", [
    ([[]], 4, "prompt is empty"), ([], 4, "prompt is empty"),
    ([[1, 2]], 0, "at least 1"), ([[1] * 250], 10, "context of 256"),
])  # fmt: skip
def test_bad_requests_are_one_line_errors(prompts, n, match):
    with pytest.raises(LowbitError, match=match):
        Runtime(tiny_llama(vocab=64)).generate(prompts, n)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}])
def test_bad_sampling_settings(kw):
    with pytest.raises(LowbitError):
        Sampling(**kw)


def test_per_row_limits_cancellation_and_the_logits_hook():
    """Each prompt its own limit; the hook sees every step's logits (greedy picks their argmax);
    returning a row index from on_tokens cancels that row only."""
    rt = Runtime(tiny_llama(vocab=64))
    prompts = [[5, 6, 7], [1, 2, 3, 4]]
    seen = []
    run = rt.generate(prompts, [3, 7], on_logits=lambda logits: seen.append(logits.clone()))
    assert [len(t) for t in run.tokens] == [3, 7] and run.finish == ["length", "length"]
    assert len(seen) == 7 and seen[0].shape == (2, 64)
    assert [int(s[1].argmax()) for s in seen] == run.tokens[1]
    assert [int(s[0].argmax()) for s in seen[:3]] == run.tokens[0]
    cancel = rt.generate(prompts, 8, on_tokens=lambda new: [0] if new[0] is not None else None)
    assert cancel.finish == ["cancelled", "length"]
    assert len(cancel.tokens[0]) == 1 and cancel.tokens[1] == rt.generate([prompts[1]], 8).tokens[0]


@pytest.mark.parametrize("kw", [
    {"temperature": 1.5e-39}, {"temperature": 1e-300}, {"temperature": 5e-324},
    {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-40, "top_p": 1e-45, "top_k": 3},
])  # fmt: skip
def test_extreme_but_valid_settings_draw_the_most_likely_token(kw):
    """A temperature or top_p near 0 (any a client may send) is a draw of the best token, never
    inf / NaN probabilities (it failed in torch.multinomial, and in a server's batch every row)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    sampling = Sampling(seed=1, **kw)
    drawn = next_tokens(logits, sampling, sampling.generator())
    assert drawn.tolist() == logits.argmax(-1).tolist()

"""Continuous batching: rows that join and leave between steps decode what they would alone,
through cache growth, moves right for longer prompts, moves left at the end of the context,
row replacement, stop tokens, cancellation and per-row sampling."""

import pytest
import torch

from helpers import tiny_family_model, tiny_llama
from lowbit.formats.spec import AttentionSpec
from lowbit.nn.attention import install_attention
from lowbit.runtime import Runtime, Sampling
from lowbit.runtime.batch import ContinuousBatch
from lowbit.runtime.kv_cache import shift


def drive(batch: ContinuousBatch, arrivals: dict[int, list], cancel: dict | None = None):
    """Run ``batch``; ``arrivals[step]`` = [(key, prompt, limit)] join before that step (or
    wait for a free row); ``cancel[step]`` = a key that leaves then. Tokens and finish by key."""
    tokens, finish, waiting, step, cancel = {}, {}, [], 0, cancel or {}
    while step <= max(arrivals) or waiting or not batch.empty:
        waiting += arrivals.get(step, [])
        if step in cancel and cancel[step] not in finish:
            batch.leave(cancel[step])
            finish[cancel[step]] = "cancelled"
        while waiting and batch.fits(len(waiting[0][1]), waiting[0][2]):
            key, prompt, limit, *sampling = waiting.pop(0)
            tokens[key] = []
            events = [batch.join(key, prompt, limit, *sampling)]
            record(events, tokens, finish)
        record(batch.step(), tokens, finish)
        step += 1
        assert step < 500
    return tokens, finish


def record(events, tokens, finish):
    for e in events:
        if e.token is not None:
            tokens[e.key].append(e.token)
        if e.finish is not None:
            finish[e.key] = e.finish


PROMPTS = {"a": [5, 6, 7], "b": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "c": [9],
           "d": [4, 4, 2, 8, 1, 3], "e": [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]}  # fmt: skip


@pytest.mark.parametrize(("family", "kv"), [("llama", None), ("qwen3", None), ("llama", 4)])
def test_rows_joining_between_steps_decode_what_they_would_alone(family, kv, monkeypatch):
    """Also with a 4-bit cache: codes, scales and minimums move with their rows."""
    import lowbit.runtime.batch as module

    moves = []
    monkeypatch.setattr(module, "shift", lambda c, r, by: (moves.append(by), shift(c, r, by)))
    model = tiny_family_model(family) if family != "llama" else tiny_llama(vocab=64)
    if kv is not None:
        install_attention(model, AttentionSpec(kv_bits=kv, hadamard=True))
    rt = Runtime(model)
    limits = {"a": 9, "b": 6, "c": 20, "d": 7, "e": 10}
    alone = {k: rt.generate([p], limits[k]).tokens[0] for k, p in PROMPTS.items()}
    # 3 rows, a cache that starts at 4 slots and may hold 24: b joins longer than the
    # cursor (rows move right), d and e wait for free rows, the cursor reaches 24 (rows move
    # left), the cache grows twice
    batch = rt.continuous(3, ())
    batch.context = 24
    batch.cache = batch.forward.new_cache(3, 4)
    arrivals = {0: [("a", PROMPTS["a"], 9)], 2: [("b", PROMPTS["b"], 6), ("c", PROMPTS["c"], 20)],
                3: [("d", PROMPTS["d"], 7)], 5: [("e", PROMPTS["e"], 10)]}  # fmt: skip
    tokens, finish = drive(batch, arrivals)
    assert tokens == alone and set(finish.values()) == {"length"}
    assert any(m > 0 for m in moves) and sum(m < 0 for m in moves) >= 2  # right, then left
    assert batch.cache.capacity == 24 and batch.empty


def test_stop_tokens_cancellation_and_sampling():
    model = tiny_llama(vocab=64)
    rt = Runtime(model)
    alone = {k: rt.generate([PROMPTS[k]], 10).tokens[0] for k in "ab"}
    stop = alone["a"][3]
    batch = rt.continuous(2, [stop])
    arrivals = {0: [("a", PROMPTS["a"], 10), ("b", PROMPTS["b"], 10)]}
    tokens, finish = drive(batch, arrivals, cancel={4: "b"})
    assert tokens["a"] == alone["a"][: alone["a"].index(stop)] and finish["a"] == "stop"
    assert finish["b"] == "cancelled" and tokens["b"] == alone["b"][: len(tokens["b"])]
    assert 0 < len(tokens["b"]) < 10
    # a seeded sampled row beside a greedy one draws what it draws alone (its own generator)
    sampled = Sampling(temperature=0.8, seed=3)
    solo = rt.generate([PROMPTS["d"]], 8, sampled).tokens[0]
    mixed, _ = drive(rt.continuous(2, ()), {0: [("a", PROMPTS["a"], 8)],
                                           1: [("d", PROMPTS["d"], 8, sampled)]})  # fmt: skip
    assert mixed["d"] == solo and mixed["a"] == alone["a"][:8]
    assert solo != rt.generate([PROMPTS["d"]], 8).tokens[0]  # it did sample


def test_forwards_that_cannot_take_rows_say_so():
    assert Runtime(tiny_family_model("gpt2")).continuous(2, ()) is None


def test_a_prompt_that_does_not_fit_is_refused():
    batch = Runtime(tiny_llama(vocab=64)).continuous(1, ())
    assert not batch.fits(batch.context, 1)
    batch.join("a", [1, 2], 4)
    assert not batch.fits(2, 4)  # no free row
    with pytest.raises(ValueError, match="fits"):
        batch.join("b", [1, 2], 4)
    assert torch.is_tensor(batch.cache.k)

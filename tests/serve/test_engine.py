"""The serving engine without HTTP: continuous batching keeps the queue bounded, and a
request whose prefill fails fails alone."""

import threading

import pytest

from helpers import tiny_llama
from lowbit.runtime import Runtime, Sampling
from lowbit.runtime.batch import ContinuousBatch
from lowbit.serve.engine import Engine, Job, QueueFull


def _job(ids, done: threading.Event, n: int = 6) -> Job:
    def emit(token):
        if token is None:
            done.set()

    return Job(list(ids), n, Sampling(), emit)


def test_a_failing_prefill_fails_its_request_only(monkeypatch):
    original = ContinuousBatch.join

    def join(self, key, ids, *args, **kwargs):
        if ids[0] == 13:
            raise RuntimeError("boom")
        return original(self, key, ids, *args, **kwargs)

    monkeypatch.setattr(ContinuousBatch, "join", join)
    engine = Engine(Runtime(tiny_llama(vocab=64)), [], max_batch=4, max_queue=8)
    events = [threading.Event() for _ in range(3)]
    jobs = [_job(p, e) for p, e in zip(([5, 6, 7], [13, 1], [8, 9]), events, strict=True)]
    for job in jobs:
        engine.submit(job)
    engine.start()
    try:
        assert all(e.wait(30) for e in events)
    finally:
        engine.close()
    assert [j.finish for j in jobs] == ["length", "error", "length"]
    assert jobs[1].error == "boom" and len(jobs[0].tokens) == len(jobs[2].tokens) == 6


def test_jobs_taken_off_the_queue_still_count_against_it():
    engine = Engine(Runtime(tiny_llama(vocab=64)), [], max_batch=1, max_queue=2)
    done = threading.Event()
    engine.submit(_job([1, 2], done))
    engine._take(wait=False)  # what the worker does between steps
    engine.submit(_job([3, 4], done))
    with pytest.raises(QueueFull):
        engine.submit(_job([5, 6], done))


def test_a_shadowed_request_keeps_its_first_steps_logits_within_the_budget(monkeypatch):
    """A long answer holds at most SHADOW_BYTES of served logits; the monitor scores the steps
    kept (prompt + those tokens through the reference, KL 0 against itself)."""
    import torch

    from lowbit.serve import engine as engine_module
    from lowbit.serve.metrics import Metrics
    from lowbit.serve.shadow import Shadow

    monkeypatch.setattr(engine_module, "SHADOW_BYTES", 64 * 4 * 3)  # 3 steps of 64 logits
    model = tiny_llama(vocab=64)
    done = threading.Event()
    job = _job([5, 6, 7], done, n=8)
    offered = []

    class Every:  # shadows every request; the finished job is scored below
        def wants(self):
            return True

        def offer(self, job):
            offered.append(job)

    engine = Engine(Runtime(model), [], max_batch=2, max_queue=4, shadow=Every())
    engine.submit(job)
    engine.start()
    try:
        assert done.wait(30)
    finally:
        engine.close()
    assert offered == [job] and len(job.tokens) == 8 and len(job.logits) == 3
    seen = []

    def ref(ids, use_cache=False):
        seen.append(ids.shape)
        return model(ids, use_cache=False)

    shadow = Shadow(ref, 1.0, None, Metrics())
    shadow._score(job)
    assert seen == [torch.Size([1, 6])]  # the prompt and the 3 kept steps' tokens
    kl, top1 = shadow.recent[-1]
    assert kl == pytest.approx(0.0, abs=1e-4) and top1 == 1.0

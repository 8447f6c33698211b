"""Speed runs on a tiny model: shapes of the result, alternation, medians, and the bench data."""

import pytest
import torch

from helpers import tiny_llama
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.eval import bench, speed
from lowbit.eval.machine import EnergyMeter
from lowbit.models.arena import move_into_arena
from lowbit.runtime import Runtime


def test_timed_run_counts_prompt_and_new_tokens():
    model = tiny_llama(vocab=50)
    run = speed.timed_run(Runtime(model), speed.random_prompt(50, 12), 5, EnergyMeter("none"))
    assert run.prompt_tokens == 12 and run.new_tokens == 5
    assert run.ttft_s > 0 and run.decode_s > 0
    assert run.prefill_tps == pytest.approx(12 / run.ttft_s)
    assert run.decode_tps == pytest.approx(4 / run.decode_s)


def test_models_alternate_and_medians_are_reported(monkeypatch):
    models = {"a": tiny_llama(vocab=50, seed=1), "b": tiny_llama(vocab=50, seed=2)}
    names = {id(m): n for n, m in models.items()}
    order, timed = [], speed.timed_run

    def recorded(runtime, prompt, new_tokens, meter):
        order.append((names[id(runtime.model)], new_tokens))
        return timed(runtime, prompt, new_tokens, meter)

    monkeypatch.setattr(speed, "timed_run", recorded)
    results = speed.measure_speed(models, prompt_tokens=8, new_tokens=3, repeats=3, progress=False)
    assert order == [("a", 4), ("b", 4)] + [("a", 3), ("b", 3)] * 3  # warm-ups, then rounds
    assert set(results) == {"a", "b"}
    for r in results.values():
        assert len(r.runs) == 3
        rates = sorted(x.decode_tps for x in r.runs)
        assert r.decode_tps == rates[1]
        assert r.to_dict()["joules_per_token"] is None


def test_bad_speed_arguments_are_refused():
    with pytest.raises(LowbitError, match="new_tokens"):
        speed.measure_speed({"a": tiny_llama()}, new_tokens=1)
    with pytest.raises(LowbitError, match="exceed a's 256 positions"):
        speed.measure_speed({"a": tiny_llama()}, prompt_tokens=250, new_tokens=10)


def test_every_model_takes_the_one_prompt(monkeypatch):
    """A --ref with fewer token ids or a shorter context than MODEL: the prompt is drawn from
    ids every model knows, and a context too short for it is an error naming that model."""
    small = tiny_llama(vocab=48)
    small.config.max_position_embeddings = 64
    drawn = []
    zeros = lambda v, n: drawn.append(v) or torch.zeros(1, n, dtype=torch.long)  # noqa: E731
    monkeypatch.setattr(speed, "random_prompt", zeros)
    speed.measure_speed({"a": tiny_llama(), "b": small}, prompt_tokens=8, new_tokens=3,
                        repeats=1, progress=False)  # fmt: skip
    assert drawn == [48]
    with pytest.raises(LowbitError, match="exceed b's 64 positions"):
        speed.measure_speed({"a": tiny_llama(), "b": small}, prompt_tokens=60, new_tokens=10)


@pytest.mark.parametrize("moved", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_bytes_read_per_token_skip_an_untied_embedding_table(tie, moved):
    model = tiny_llama(vocab=64, hidden=32, tie=tie)
    if moved:  # as a loaded model's: every tensor in one block (one storage)
        move_into_arena(model)
    total = bench.model_size(model).total_bytes
    table = 64 * 32 * 4
    assert bench.bytes_read_per_token(model) == (total if tie else total - table)


@pytest.mark.parametrize("linears", [False, True])
def test_a_decoded_token_reads_only_the_experts_it_is_routed_to(linears):
    """Mixtral with 8 experts of which 2 run per token: 6/8 of the experts' bytes unread, the
    experts counted whole whether fused (transformers') or as linear views of those weights."""
    from helpers import tiny_moe
    from lowbit.models.experts import experts_to_linears

    model = tiny_moe("mixtral", num_local_experts=8, num_experts_per_tok=2)
    held = [*model.parameters(), *model.buffers()]  # untied: nothing shared
    total = sum(t.numel() * t.element_size() for t in held)
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    if linears:
        experts_to_linears(model)
    table = model.get_input_embeddings().weight.numel() * 4
    assert bench.model_size(model).total_bytes == total
    assert bench.bytes_read_per_token(model) == total - table - experts * 6 // 8


def test_bench_of_a_saved_folder_reports_ratios_and_rss(tiny_folder, tmp_path):
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, "w4-rtn-g64", progress=False)
    folder = api.save(src.model, tmp_path / "q", report, source=src)
    results, facts = api.bench({"q": str(folder), "fp": str(tiny_folder)}, prompt_tokens=8,
                               new_tokens=3, repeats=1, progress=False)  # fmt: skip
    q, fp = results["q"], results["fp"]
    assert q.weight_bytes < fp.weight_bytes
    assert q.peak_rss_mb and q.peak_rss_mb > 10
    assert q.bound_decode_tps == pytest.approx(facts["bandwidth_gbs"] * 1e9 / q.bytes_per_token,
                                               rel=0.01)  # fmt: skip
    ratios = bench.speedups(q, fp)
    assert ratios["weight_memory_ratio"] < 1 and ratios["speedup_decode"] > 0

"""The compact Llama-like forward against the model's own, on every family it accepts."""

import pytest
import torch

from helpers import compact_and_hf, decode_steps, rel, tiny_family_model, tiny_llama, torch_threads
from lowbit.formats.spec import AttentionSpec
from lowbit.kernels import decode
from lowbit.runtime.hf_forward import HFForward
from lowbit.runtime.llama import FAMILIES, LlamaForward
from lowbit.runtime.llama_twin import unsupported_reason

COMPACT = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("family", [*COMPACT, "olmo2"])  # olmo2: post-norm, by its twin
def test_logits_equal_the_models_own(family, native, monkeypatch):
    """Prefill and decode logits within 1e-4 relative of transformers' forward, with the fused
    decode ops and with their references."""
    if not native:
        monkeypatch.setattr(decode, "_native", lambda *t: False)
    model = tiny_family_model(family)
    if family == "qwen2":  # q/k/v biases: the fused call must add them
        for m in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj):
            torch.nn.init.normal_(m.bias)
    ours, theirs, whole, _ = compact_and_hf(model, seed=1)
    assert rel(ours, theirs) < 1e-4 and rel(ours, whole) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_runs_in_its_own_dtype(dtype):
    """RoPE and the cache in the model's dtype, as transformers computes them: logits within
    16-bit rounding of the model's own and the same greedy tokens."""
    model = tiny_llama(vocab=64).to(dtype)
    ours, theirs, whole, cache = compact_and_hf(model, seed=2)
    assert ours.dtype == dtype and cache.tensors[0].dtype == dtype
    assert rel(ours.float(), theirs.float()) < 2e-2 and rel(ours.float(), whole.float()) < 2e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_left_padded_rows_equal_rows_alone():
    """Prompts of different lengths in one batch: each row's logits are those it gets alone."""
    model = tiny_llama(vocab=64)
    forward = LlamaForward(model)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        cache = forward.new_cache(2, 32)
        cache.pad[0] = 3
        batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        first = forward(batch, cache)
        nxt = forward(torch.tensor([[9], [9]]), cache)
        for row, p in enumerate((short, long)):
            alone = forward.new_cache(1, 32)
            assert rel(first[row], forward(p, alone)[0]) < 1e-5
            assert rel(nxt[row], forward(torch.tensor([[9]]), alone)[0]) < 1e-5


@pytest.mark.parametrize("family", ["gemma", "gemma2", "opt", "gpt2"])
def test_other_families_say_why(family):
    reason = unsupported_reason(tiny_family_model(family), 64)
    assert reason and "model type" in reason


def test_rope_it_cannot_tabulate_is_refused():
    """Phi-3's LongRoPE switches its factors past the original context (fine below it);
    Phi-4-mini's RoPE on part of each head; Phi-3's sliding window (every layer)."""
    model = tiny_family_model("phi3")
    assert unsupported_reason(model, 64) is None
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "longrope",
                                    "original_max_position_embeddings": 32}  # fmt: skip
    assert "LongRoPE" in unsupported_reason(model, 64)
    assert unsupported_reason(model, 32) is None
    model = tiny_family_model("phi3")
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.75}
    assert "part of each head" in unsupported_reason(model, 64)
    model = tiny_family_model("phi3")
    model.config.sliding_window = 16
    assert "sliding" in unsupported_reason(model, 64)


def test_sliding_window_shorter_than_the_context_is_refused():
    model = tiny_family_model("mistral")
    model.config.sliding_window = 16
    assert "sliding" in unsupported_reason(model, 64)
    assert unsupported_reason(model, 16) is None
    assert set(COMPACT) == set(FAMILIES)


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [("w4-sym-g32", "w4a16"), ("w8a8-dynamic", "w8a8"), ("w8a8-dynamic-head8", "w8a8")],
)
@pytest.mark.parametrize("native", [True, False])
def test_quantized_kernel_layers_run_on_the_compact_forward(native, recipe, kind, monkeypatch):
    """W4 and W8A8 layers on the kernels (fused q/k/v and gate/up calls, direct op calls at
    decode): the same logits as the model's own forward on the same layers, within 1e-4
    relative."""
    if not native:
        monkeypatch.setattr(decode, "_native", lambda *t: False)
    counts, error = _quantized_compact_against_hf(tiny_llama(vocab=64, hidden=64), recipe, 2)
    assert counts.get(kind) and counts.get("shared-input groups")
    assert error < 1e-4


@pytest.mark.parametrize("recipe", ["w4-sym-g32", "w8a8-dynamic"])
def test_a_quantized_phi3_runs_on_the_compact_forward(recipe):
    """Phi-3's fused qkv_proj and gate_up_proj as kernel layers: one call each, the same logits
    as the model's own forward on the same layers within 1e-4."""
    counts, error = _quantized_compact_against_hf(tiny_family_model("phi3"), recipe, 3)
    assert counts and error < 1e-4


@pytest.mark.parametrize("recipe", ["w4-sym-g32", "w8a8-dynamic"])
def test_a_quantized_post_norm_model_runs_on_the_compact_forward(recipe):
    """OLMo 2's post-norm blocks on kernel layers (the per-op decode loop): the same logits as
    the model's own forward on the same layers within 1e-4."""
    counts, error = _quantized_compact_against_hf(tiny_family_model("olmo2"), recipe, 4)
    assert counts and error < 1e-4


def _quantized_compact_against_hf(model, recipe: str, seed: int) -> tuple[dict, float]:
    """Quantize ``model`` onto the kernels; (the kernels' counts, the largest relative
    difference between the compact loop's and the model's own prefill and decode logits)."""
    from lowbit import api
    from lowbit.models.kernels import use_kernels

    api.quantize(model, recipe, progress=False)
    counts = use_kernels(model)
    g = torch.Generator().manual_seed(seed)
    prompt, follow = torch.randint(0, 64, (1, 7), generator=g), torch.randint(0, 64, (1, 6))
    with torch.inference_mode():
        ours, _ = decode_steps(LlamaForward(model), prompt, follow)
        theirs, _ = decode_steps(HFForward(model), prompt, follow)
    return counts, rel(ours, theirs)


@pytest.mark.parametrize("recipe", ["w4-sym-g32", "w8-rtn"])
def test_prompts_take_int8_inputs_where_evaluation_keeps_float(recipe, monkeypatch):
    """A prompt longer than GEMV_MAX_ROWS: the loop's W4 and W8 layers quantize its inputs to
    int8 (the integer GEMM), the model's own forward (evaluation) keeps them float; with the
    module's threshold raised, the model's forward takes int8 inputs too and the two agree."""
    from lowbit import api
    from lowbit.kernels import affine
    from lowbit.models.kernels import use_kernels

    model = tiny_llama(vocab=64, hidden=64)
    api.quantize(model, recipe, progress=False)
    use_kernels(model)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 64, (1, 2 * affine.GEMV_MAX_ROWS + 5), generator=g)
    follow = torch.randint(0, 64, (1, 3), generator=g)
    n = prompt.shape[1] + follow.shape[1]
    with torch.inference_mode():
        ours, _ = decode_steps(LlamaForward(model), prompt, follow, n)
        float_inputs, _ = decode_steps(HFForward(model), prompt, follow, n)
        monkeypatch.setattr(affine, "GEMV_MAX_ROWS", 10**6)
        int8_inputs, _ = decode_steps(HFForward(model), prompt, follow, n)
    assert rel(ours, int8_inputs) < 1e-4
    assert 1e-4 < rel(ours, float_inputs) < 0.1


@pytest.mark.parametrize("recipe", ["w4-sym-g32", "w8-rtn"])
def test_decode_calls_keep_their_inputs_past_32_rows(recipe):
    """A continuous batch of more than PROMPT_ROWS rows runs the per-op decode loop on the
    layers' native calls: 4- and 8-bit layers round their inputs to int8 there, as at fewer
    rows (their decode arithmetic at every size), where the module keeps an evaluation
    window's float inputs."""
    from lowbit import api
    from lowbit.kernels import affine
    from lowbit.kernels.build import native_ops
    from lowbit.models.kernels import use_kernels

    if not native_ops():
        pytest.skip("the layers' native calls need the native kernels")
    model = tiny_llama(vocab=64, hidden=64)
    api.quantize(model, recipe, progress=False)
    use_kernels(model)
    o_proj = model.model.layers[0].self_attn.o_proj
    layer = LlamaForward(model).layers[0]
    x = torch.randn(decode.PROMPT_ROWS + 8, 64, generator=torch.Generator().manual_seed(0))
    aw = affine.AffineWeight(o_proj.w, o_proj.scale, o_proj.offset, o_proj.group, o_proj.bits,
                             o_proj.in_features)  # fmt: skip
    with torch.inference_mode():
        want = affine.affine_linear(x, aw, act8=True)
        assert rel(layer.fast[1](x), want) < 1e-6  # the per-op decode loop's call
        # one position per row through the prompt path (e.g. every logit asked for)
        assert rel(layer.o_proj(x.unsqueeze(1)).squeeze(1), want) < 1e-6
        prompt = x.view(2, -1, 64)  # a prompt's rows: int8 inputs for 4- and 8-bit layers
        got = layer.o_proj(prompt).reshape(x.shape[0], -1)
        assert rel(got, affine.affine_linear(x, aw, act8=True)) < 1e-6
        window = affine.affine_linear(x, aw, act8=False)  # the module's own: float inputs
        assert rel(o_proj(x), window) < 1e-6 and rel(window, want) > 1e-5


def _stepped_and_looped(model, seed: int, pad_row: int, pad: int) -> list[tuple]:
    """(logits of a prompt and 4 decode steps, the cache's stored tensors, decode_step calls)
    with the one-call step and with the per-op loop, 2 rows, one of them left-padded."""
    stepped, looped = LlamaForward(model), LlamaForward(model)
    assert stepped._step is not None
    looped.__dict__["_step"] = None  # the cached property: the per-op loop
    g = torch.Generator().manual_seed(seed)
    prompt, follow = torch.randint(0, 64, (2, 6), generator=g), torch.randint(0, 64, (2, 4))
    runs = []
    with torch.inference_mode():
        for forward in (stepped, looped):
            cache = forward.new_cache(2, 16)
            cache.pad[pad_row] = pad
            with torch.profiler.profile() as prof:
                steps = [forward(prompt, cache)]
                steps += [forward(t.view(-1, 1), cache) for t in follow.T]
            calls = sum(e.name == "lowbit_cpu::decode_step" for e in prof.events())
            runs.append((torch.stack(steps), torch.cat([t.flatten() for t in cache.tensors]),
                         calls))  # fmt: skip
    return runs


@pytest.mark.parametrize("recipe", [None, "w4-sym-g32", "w8-rtn", "w8a8-dynamic"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "olmo2"])  # olmo2: post-norm
def test_one_call_step_equals_the_per_op_loop(family, recipe):
    """The whole decode step as one native call (``lowbit_cpu::decode_step``) runs the loop's
    ops in the loop's order: the same logits to the bit, left-padded rows included."""
    from lowbit import api
    from lowbit.kernels.build import native_ops
    from lowbit.models.kernels import use_kernels

    if not native_ops():
        pytest.skip("native kernels unavailable here")
    model = tiny_family_model(family)
    if recipe:
        api.quantize(model, recipe, progress=False)
        use_kernels(model)
    (logits, _, calls), (want, _, looped_calls) = _stepped_and_looped(model, 4, 0, 2)
    assert (calls, looped_calls) == (4, 0)  # the step ran at every decode step, the loop never
    assert torch.equal(logits, want)


@pytest.mark.parametrize(
    "spec",
    [AttentionSpec(kv_bits=4, hadamard=True), AttentionSpec(kv_bits=8, group_size=8, query_bits=8),
     AttentionSpec(kv_bits=4, group_size=8, center_keys=True), AttentionSpec(kv_bits=16)],
    ids=lambda s: s.short(),
)  # fmt: skip
def test_one_call_step_over_a_cache_of_codes_equals_the_per_op_loop(spec):
    """A cache of low-bit codes: the step calls decode_attention_codes where the loop does,
    with the same key centres, turn and query rounding (the same logits and stored codes to
    the bit); a float16 cache (kv16), decode_attention over its float16 keys and values."""
    from lowbit import api
    from lowbit.kernels.build import native_ops
    from lowbit.models.kernels import use_kernels
    from lowbit.nn.attention import CENTER, add_key_centers, attention_modules, install_attention

    if not native_ops():
        pytest.skip("native kernels unavailable here")
    model = tiny_family_model("qwen3")  # per-head q/k norms too
    api.quantize(model, "w4-sym-g32", progress=False)
    use_kernels(model)
    install_attention(model, spec)
    if spec.center_keys:  # stand-in centres (quantization measures them)
        add_key_centers(model)
        for i, m in enumerate(attention_modules(model)):
            getattr(m, CENTER).normal_(generator=torch.Generator().manual_seed(i))
    (logits, stored, calls), (want, want_stored, looped_calls) = _stepped_and_looped(model, 5, 1, 1)
    assert (calls, looped_calls) == (4, 0)
    assert torch.equal(logits, want) and torch.equal(stored, want_stored)


def test_one_call_step_only_where_every_layer_is_native():
    from lowbit.kernels.build import native_ops

    if not native_ops():
        pytest.skip("native kernels unavailable here")
    assert LlamaForward(tiny_family_model("llama"))._step is not None
    model = tiny_family_model("qwen2")  # q/k/v biases: the joint call, not a native part
    assert LlamaForward(model)._step is None


def test_one_call_step_refuses_a_layout_that_does_not_fit():
    from lowbit.kernels.build import native_ops

    if not native_ops():
        pytest.skip("native kernels unavailable here")
    forward = LlamaForward(tiny_llama(vocab=64))
    weights, layout, norms, eps = forward._step_lists()
    cache = forward.new_cache(1, 8)
    x = torch.randn(1, 64)
    args = (cache.tensors, [], torch.empty(0), forward.cos, forward.sin, cache.pad, 0, 4, 2, 0.25,
            0, 0)  # fmt: skip
    plan = torch.classes.lowbit_cpu.DecodePlan
    with pytest.raises(RuntimeError, match="layout ends"):
        torch.ops.lowbit_cpu.decode_step(x, x.clone(), plan(weights, layout[:-3], norms, eps),
                                         *args)  # fmt: skip
    with pytest.raises(RuntimeError, match="more weights"):
        torch.ops.lowbit_cpu.decode_step(x, x.clone(), plan(weights + weights[:1], layout, norms,
                                                             eps), *args)  # fmt: skip
    with pytest.raises(RuntimeError, match="4 norms"):
        plan(weights, layout, norms[:-1], eps)
    with pytest.raises(RuntimeError, match="no layer 2"):
        plan(weights, layout, norms, eps).set_whole(2, norms[0], norms[1], 1e-6, 1e-6)


def test_short_prompts_of_a_pooled_model_hold_torch_to_one_thread(monkeypatch):
    """Up to 32 tokens into an empty cache every layer call of a model on pooled kernels is a
    pooled GEMV: torch's own ops (attention, norms) run on one thread meanwhile, with the same
    logits within float rounding; a prompt onto a filled cache (attention over it in torch)
    or a longer one keeps torch's threads."""
    from lowbit import api
    from lowbit.kernels.build import native_ops
    from lowbit.models.kernels import use_kernels

    if not native_ops() or torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("native kernels unavailable here, or OpenMP runs them")
    model = tiny_family_model("llama")
    api.quantize(model, "w4-sym-g32-head8", progress=False)
    use_kernels(model)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    probe = lambda *a, **k: seen.append(torch.get_num_threads()) or sdpa(*a, **k)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", probe)
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(6))
    with torch_threads(2), torch.inference_mode():
        forward = LlamaForward(model)
        assert forward._pooled
        cache = forward.new_cache(1, 40)
        held = forward(ids[:, :32], cache, all_logits=True)
        layers = len(seen)
        forward(ids[:, 32:], cache, all_logits=True)  # onto a filled cache
        free = forward._forward(ids[:, :32], forward.new_cache(1, 40), True, False)
        forward(ids, forward.new_cache(1, 40))  # 33 tokens
    assert set(seen[:layers]) == {1} and set(seen[layers:]) == {2}
    assert rel(held, free) < 1e-5

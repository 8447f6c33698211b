"""Families the compact forward does not name: it runs them only where a tiny random twin of
the model computes the same logits on it as on the model's own forward."""

import logging

import pytest
import torch

from helpers import compact_and_hf, rel, tiny_family_model, torch_threads
from lowbit.runtime import Runtime
from lowbit.runtime.llama_twin import family_reason


def _renamed(model, model_type: str):
    model.config.model_type = model_type
    return model


def _runs_compact_as_its_own(model, seed: int) -> None:
    """The twin agrees; the compact loop's logits (prompt, decoded tokens) and greedy tokens
    are the model's own forward's."""
    assert family_reason(model) is None
    ours, theirs, whole, _ = compact_and_hf(model, seed=seed)
    assert rel(ours, theirs) < 1e-4 and rel(ours, whole) < 1e-4
    ids = [[3, 9, 4, 1, 5]]
    compact, own = Runtime(model).generate(ids, 6), Runtime(model, compact=False).generate(ids, 6)
    assert compact.path == "compact" and own.path == "hf" and compact.tokens == own.tokens


def test_a_llama_under_another_name_runs_compact():
    _runs_compact_as_its_own(_renamed(tiny_family_model("llama"), "llama-clone"), seed=1)


def test_granite_multipliers_keep_the_models_own_forward(caplog):
    import transformers as tf

    base = tiny_family_model("granite").config.to_dict()  # multipliers 2, 0.5 and 3
    model = tf.AutoModelForCausalLM.from_config(tf.GraniteConfig.from_dict(base)).eval()
    assert "computes more than a Llama" in family_reason(model)
    with caplog.at_level(logging.INFO, logger="lowbit.runtime.generate"):
        result = Runtime(model).generate([[3, 9, 4]], 3)
    assert result.path == "hf" and "computes more than a Llama" in caplog.text


def test_the_twin_keeps_the_depth_where_blocks_differ():
    """SmolLM3 leaves RoPE out of every fourth block: a two-block twin would not see it."""
    import transformers as tf

    config = tf.SmolLM3Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    assert 0 in config.no_rope_layers[2:]  # the layer without RoPE is past the first two
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    assert "computes more than a Llama" in family_reason(model)
    config.no_rope_layers = [1] * 4  # RoPE on every block: the same config passes
    assert family_reason(tf.AutoModelForCausalLM.from_config(config).eval()) is None


def test_rope_settings_beyond_the_table_keep_the_models_own_forward():
    """Ministral 3 scales its queries past 16,384 positions (llama_4_scaling_beta): the twin
    sees 12, so that setting is refused by name."""
    import transformers as tf

    config = tf.Ministral3Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16)  # fmt: skip
    assert config.rope_parameters.get("llama_4_scaling_beta")
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    assert "llama_4_scaling_beta" in family_reason(model)


def test_a_twin_that_cannot_be_checked_falls_back_and_leaves_the_seed_alone():
    """A renamed Llama with a scalar parameter its forward uses: the twin differs (or cannot
    be built), the runtime falls back instead of failing, and the global random state is the
    one the caller seeded."""
    import transformers as tf

    class Tempered(tf.LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.temperature = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / self.temperature
            return out

    model = _renamed(Tempered(tiny_family_model("llama").config).eval(), "tempered")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert family_reason(model) is not None
    assert torch.equal(torch.rand(3), expected)
    assert Runtime(model).generate([[3, 9, 4]], 2).path == "hf"


def test_an_unnamed_family_takes_a_sliding_window_as_on_every_layer():
    from lowbit.runtime.llama import capacity_reason

    model = tiny_family_model("llama")
    model.config.sliding_window = 8
    assert capacity_reason(model, 64) is None  # Llama: no window without layer_types
    assert "sliding" in capacity_reason(_renamed(model, "llama-clone"), 64)
    model.config.use_sliding_window = False  # a window the config switches off
    assert capacity_reason(model, 64) is None


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_a_mixture_runs_compact_with_its_own_mixture_block(kind):
    """Mixtral, Qwen2-MoE (a shared expert) and OLMoE (q/k norms over all heads) pass the
    twin: the compact loop calls each block's mixture as it is; the same logits as the
    model's own forward, prompt and decoded tokens, and the same greedy tokens."""
    from helpers import tiny_moe
    from lowbit.models.experts import experts_to_linears

    model = tiny_moe(kind)
    experts_to_linears(model)
    _runs_compact_as_its_own(model, seed=2)


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_a_quantized_mixture_decodes_each_token_in_one_call(kind, monkeypatch):
    """4-bit experts on the compact loop: a decoded token of batch 1 is one native call
    (``lowbit_cpu::decode_step``, its mixture blocks' routers included; OLMoE's q/k norms over
    all heads too), torch's ops on one thread meanwhile, with the logits of the per-op loop
    (each block one native call), of the block's own forward (its experts in two native calls)
    and of the per-expert loop, to the bit. A hook on a block takes the per-op loop, where the
    hook runs; two rows take one call per token too, each row's experts as alone, and more
    rows than the experts over the picks per token (E // k) the per-op loop's batched block."""
    from helpers import decode_steps, tiny_moe
    from lowbit import api
    from lowbit.kernels.build import native_ops
    from lowbit.models import experts
    from lowbit.models.kernels import pooled_layers, use_kernels
    from lowbit.runtime import llama
    from lowbit.runtime.llama import LlamaForward

    if not native_ops() or torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("native kernels unavailable here, or OpenMP runs them")
    model = tiny_moe(kind)
    experts.experts_to_linears(model)
    assert not pooled_layers(model.model.layers[0].mlp)  # float experts: torch's threads
    api.quantize(model, "w4-sym-g32", progress=False)
    use_kernels(model)
    assert pooled_layers(model.model.layers[0].mlp)
    threads, real = [], torch.ops.lowbit_cpu.decode_step

    def counted(*args):
        threads.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(torch.ops.lowbit_cpu, "decode_step", counted)
    g = torch.Generator().manual_seed(4)
    prompt, follow = (
        torch.randint(0, 64, (1, 9), generator=g),
        torch.randint(0, 64, (1, 5), generator=g),
    )
    with torch_threads(2), torch.inference_mode():
        forward = LlamaForward(model)
        assert forward._step is not None and (kind == "olmoe") == bool(forward.layers[0].whole)
        native, _ = decode_steps(forward, prompt, follow)
        assert threads == [1] * 5  # 5 decoded tokens
        per_op = LlamaForward(model)
        per_op.__dict__["_step"] = None  # the cached property: the per-op loop
        looped_blocks, _ = decode_steps(per_op, prompt, follow)
        monkeypatch.setattr(llama, "mixture_step", lambda block: None)
        two_calls, _ = decode_steps(LlamaForward(model), prompt, follow)
        monkeypatch.setattr(experts, "one_token_experts", lambda *a: None)
        looped, _ = decode_steps(LlamaForward(model), prompt, follow)
    assert len(threads) == 5
    for other in (looped_blocks, two_calls, looped):
        assert torch.equal(native, other)
    monkeypatch.undo()
    seen = []  # a hook on a block sends the token through the per-op loop and the block
    hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(1))
    with torch_threads(2), torch.inference_mode():  # (as above, whatever OMP_NUM_THREADS says)
        hooked, _ = decode_steps(LlamaForward(model), prompt, follow)
        assert len(seen) == 1 + 5 and torch.equal(hooked, native)  # the prompt, each token
        hook.remove()
        monkeypatch.setattr(torch.ops.lowbit_cpu, "decode_step", counted)
        threads.clear()
        rows = torch.cat([prompt, prompt.flip(1)])
        both, _ = decode_steps(LlamaForward(model), rows, torch.cat([follow, follow]))
        per_op = LlamaForward(model)
        per_op.__dict__["_step"] = None
        both_looped, _ = decode_steps(per_op, rows, torch.cat([follow, follow]))
        many = forward._mixtures[0].rows + 1  # more rows than the blocks' native step takes
        decode_steps(LlamaForward(model), prompt.repeat(many, 1), follow.repeat(many, 1))
    assert threads == [1] * 5 and torch.equal(both, both_looped)
    assert rel(both[:1], native) < 1e-4  # (2-row kernels: other sums than 1 row's)
    monkeypatch.undo()
    blocks = []  # a prompt of up to 32 tokens holds torch to one thread too, a longer one not
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: blocks.append(torch.get_num_threads())
    )
    with torch_threads(2), torch.inference_mode():
        forward = LlamaForward(model)
        for length in (32, 33):
            forward(torch.randint(0, 64, (1, length), generator=g), forward.new_cache(1, 40))
    assert blocks == [1, 2]


def test_a_latent_attention_or_clipped_qkv_keeps_the_models_own_forward():
    from helpers import tiny_moe
    from lowbit.models.experts import experts_to_linears

    model = tiny_moe("deepseek_v3")
    experts_to_linears(model)
    assert "lack a Llama block's norms and projections" in family_reason(model)
    clipped = tiny_moe("olmoe", clip_qkv=8.0)
    experts_to_linears(clipped)
    from lowbit.runtime.llama import capacity_reason

    assert "clipped" in capacity_reason(clipped, 32)


def test_a_post_norm_family_runs_compact():
    """OLMo 2 norms each sublayer's output before its residual add and has no input norm (its
    q/k norms span all heads): the compact loop computes that too, its decode step in one
    native call as for pre-norm blocks."""
    from lowbit.kernels.build import native_ops
    from lowbit.runtime.llama import LlamaForward

    model = tiny_family_model("olmo2")
    assert not hasattr(model.model.layers[0], "input_layernorm")
    _runs_compact_as_its_own(model, seed=3)
    forward = LlamaForward(model)
    assert forward.layers[0].post is not None
    assert forward._step is not None or not native_ops()


def test_a_model_whose_linears_hold_no_weight_keeps_its_own_forward():
    """transformers runs a compressed-tensors folder with its layers compressed (no weight
    tensor): generate and bench crashed reading one in the compact loop."""
    from helpers import tiny_llama
    from lowbit.runtime.llama_twin import unsupported_reason

    model = tiny_llama()
    assert unsupported_reason(model, 32) is None
    del model.model.layers[1].mlp.down_proj._parameters["weight"]
    assert "model.layers.1.mlp.down_proj holds no weight" in unsupported_reason(model, 32)

"""Rotations folded into the weights leave the float model's outputs unchanged, in memory and
when a checkpoint is streamed through :class:`lowbit.models.rotate_source.RotatedSource`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import make_recipe, rel, tiny_family_model, tiny_llama
from lowbit import api
from lowbit.algorithms.rotate import RotateOptions, orthogonal
from lowbit.errors import LowbitError
from lowbit.models.rotate import rotate_model


def _perturb_norms(model):
    """Random norm scales (a fresh model's are all 1: folding them would prove nothing)."""
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.data = 1 + 0.5 * torch.rand(p.shape, generator=g)
        elif name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize(
    "family",
    ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "opt", "gpt2", "granite", "arcee"],
)
def test_rotation_leaves_the_float_model_unchanged(family, kind, heads):
    """Phi-3: fused q/k/v and gate/up weights (the values' head rotation on qkv_proj's last
    rows); Gemma: norms that scale by 1 + w, so a folded norm keeps w = 0; OPT and GPT-2:
    LayerNorms (random scales and biases) whose mean the rotation keeps, their biases folded
    into the readers' biases and, for the head, into the final norm's; Granite (multipliers)
    and Arcee (an MLP without a gate): families lowbit does not name, checked on a twin."""
    model = tiny_family_model(family)
    _perturb_norms(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(model, RotateOptions(kind=kind, heads=heads))
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    first = {"opt": "model.decoder.layers.0.self_attn_layer_norm",
             "gpt2": "transformer.h.0.ln_1"}  # fmt: skip
    norm = model.get_submodule(first.get(family, "model.layers.0.input_layernorm"))
    unit = 0.0 if family == "gemma" else 1.0
    assert torch.equal(norm.weight, torch.full_like(norm.weight, unit))
    if family in ("opt", "gpt2"):
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_a_tied_head_is_untied_and_the_embedding_keeps_no_norm():
    model = tiny_llama(vocab=64, tie=True)
    _perturb_norms(model)
    rotate_model(model, RotateOptions())
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_orthogonal_matrices_are_seeded():
    a, b = orthogonal(12, RotateOptions(seed=1)), orthogonal(12, RotateOptions(seed=2))
    assert torch.allclose(a @ a.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.equal(a, orthogonal(12, RotateOptions(seed=1))) and not torch.equal(a, b)


@pytest.mark.parametrize(
    ("family", "options", "why"),
    [("gemma2", {"kind": "random"}, "'gemma2' normalises its sub-blocks' outputs.*not random"),
     ("gemma3", {"kind": "learned"}, "'gemma3_text' normalises its sub-blocks'.*not learned"),
     ("opt", {"online": ("down_proj",)}, "LayerNorm.*no online rotation"),
     ("gpt2", {"kind": "learned"}, "LayerNorm.*kind hadamard or random")],
)  # fmt: skip
def test_rotations_it_cannot_fold_are_a_clear_error(family, options, why):
    model = tiny_family_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match=why):
        rotate_model(model, RotateOptions(**options))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k in after)  # untouched


def test_streamed_rotation_equals_rotation_in_memory(tiny_folder, tmp_path):
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=RotateOptions())  # fmt: skip
    streamed, _ = api.quantize_to(str(tiny_folder), recipe, tmp_path / "s", progress=False)
    src = api.load_model(str(tiny_folder))
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = src.model(ids).logits
        api.quantize(src.model, recipe, progress=False)
        mem = src.model(ids).logits
        got = api.load(streamed, kernels=False).model(ids).logits
    assert rel(got, mem) < 1e-5
    assert rel(got, float_logits) < 0.05  # W8 of the rotated model: close to the float one


@pytest.mark.parametrize("family", ["llama48", "qwen2", "phi3", "gemma"])
def test_an_online_down_proj_rotation_leaves_the_float_model_unchanged(family):
    """down_proj's input turned at run time, its weight W·H: the same function (hidden 48:
    widths 48 and 96 take a Paley block of 12)."""
    from lowbit.models.fold import can_fold
    from lowbit.nn.online import online_transform

    model = tiny_llama(vocab=64, hidden=48) if family == "llama48" else tiny_family_model(family)
    _perturb_norms(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(model, RotateOptions(online=("down_proj",)))
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    assert all(online_transform(b.mlp.down_proj) is not None for b in model.model.layers)
    mlp = model.model.layers[0].mlp  # AWQ / SmoothQuant cannot fold across the transform
    reader = mlp.gate_up_proj if family == "phi3" else mlp.up_proj
    assert not can_fold(reader, "linear", [mlp.down_proj])
    from helpers import compact_and_hf
    from lowbit.runtime.llama import FAMILIES

    if model.config.model_type in FAMILIES:  # the compact loop's families
        ours, theirs, _, _ = compact_and_hf(model, seed=3)  # float down_proj: the module's hook
        assert rel(ours, theirs) < 1e-4
    with pytest.raises(LowbitError, match="is not one of down_proj"):
        RotateOptions(online=("up_proj",))


def test_an_online_rotation_is_carried_saved_loaded_and_decoded(tiny_folder, tmp_path):
    """Packed layers keep the transform, a loaded folder installs it, the compact decode loop
    (which calls layers directly) applies it, and exporters refuse the folder."""
    from helpers import compact_and_hf
    from lowbit.export import export

    online = RotateOptions(online=("down_proj",))
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=online)  # fmt: skip
    out, _ = api.quantize_to(str(tiny_folder), recipe, tmp_path / "s", progress=False)
    src = api.load_model(str(tiny_folder))
    # 40 tokens: an evaluation window, on float inputs as QuantLinear's (decode-sized ones
    # are rounded to int8 per block of 32)
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(1))
    loaded = api.load(out)  # kernel layers: the decode loop's direct calls
    with torch.no_grad():
        float_logits = src.model(ids).logits
        api.quantize(src.model, recipe, progress=False)
        mem = src.model(ids).logits
        got = loaded.model(ids).logits
    assert rel(got, mem) < 1e-5 and rel(got, float_logits) < 0.05
    ours, theirs, _, _ = compact_and_hf(loaded.model, seed=2, vocab=50)
    assert rel(ours, theirs) < 1e-4
    with pytest.raises(LowbitError, match="rotate.online"):
        export(out, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", ["phi3", "gemma", "opt", "gpt2", "gemma2"])
def test_families_outside_the_named_ones_save_and_load_their_rotation(family, tmp_path):
    """A loaded folder finds its blocks among quantized layers (Phi-3 is no family that
    lowbit names) to install the online rotations its weights expect; a LayerNorm model's
    folded biases (the final norm's included) are saved and loaded."""
    model = tiny_family_model(family)
    _perturb_norms(model)
    online = () if family in ("opt", "gpt2") else ("down_proj",)
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=RotateOptions(online=online))  # fmt: skip
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        report = api.quantize(model, recipe, progress=False)
        mem = model(ids).logits
        folder = api.save(model, tmp_path / "q", report)
        got = api.load(folder, kernels=False).model(ids).logits
    assert rel(got, mem) < 1e-5 and rel(mem, before) < 0.05


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi3", "gemma", "gemma3"])
def test_streamed_rotation_equals_rotation_in_memory_on_other_families(family, tmp_path):
    """GPT-2's checkpoint holds its Conv1D weights as (in, out): the streamed rotation reads
    and writes them so, the in-memory one on the linears made from them."""
    from helpers import make_tokenizer

    model = tiny_family_model(family)
    _perturb_norms(model)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=RotateOptions(heads=True))  # fmt: skip
    streamed, _ = api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "s", progress=False)
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        api.quantize(model, recipe, progress=False)
        mem = model(ids).logits
        got = api.load(streamed, kernels=False).model(ids).logits
    assert rel(got, mem) < 1e-5


@pytest.mark.parametrize(
    ("family", "applied"),
    [("cohere", None), ("opt", ()), ("qwen2", ("down_proj",)), ("gemma3", ("down_proj",))],
)
def test_if_possible_drops_what_a_model_cannot_take(family, applied, tmp_path, caplog):
    """The *-best presets' rotate block (online down_proj, if_possible): Cohere (attention
    beside the MLP, after one norm) goes without a rotation, OPT without the online part,
    Qwen2 and Gemma 3 take it all; the folder's recipe (in memory and streamed) records what
    was applied, and the warning says why."""
    from helpers import make_tokenizer
    from lowbit.models.checkpoint import read_manifest

    options = RotateOptions(online=("down_proj",), if_possible=True)
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=options)  # fmt: skip
    model = tiny_family_model(family)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    with caplog.at_level("WARNING"):
        report = api.quantize(model, recipe, progress=False)
        folder, _ = api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "s", progress=False)
    rotate = read_manifest(folder)["recipe"].get("rotate")
    if applied is None:
        assert report.recipe.rotate is None and rotate is None
        assert "rotate skipped" in caplog.text and "'cohere' is not one" in caplog.text
    else:
        assert report.recipe.rotate.online == applied and tuple(rotate["online"]) == applied
        assert ("without its online part" in caplog.text) == (applied == ())
    if applied != options.online:  # without if_possible, what it cannot take is an error
        strict = dataclasses.replace(options, if_possible=False)
        with pytest.raises(LowbitError, match="rotate"):
            api.quantize(tiny_family_model(family), dataclasses.replace(recipe, rotate=strict),
                         progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("family", "flag", "why"),
    [("opt", {"layer_norm_elementwise_affine": False}, "no scale and bias"),
     ("opt", {"_remove_final_layer_norm": True}, "no final norm"),
     ("gpt2", {"add_cross_attention": True}, "cross-attention reads the stream")],
)  # fmt: skip
def test_layernorm_variants_it_cannot_fold_are_a_clear_error(family, flag, why):
    """Configs whose weights a LayerNorm rotation would miss: an error, also for if_possible
    (which then quantizes without the rotation), never a wrong model or a KeyError."""
    import transformers as tf

    from lowbit.models.rotate import fitted_rotation

    base = tiny_family_model(family).config.to_dict()
    config = type(tiny_family_model(family).config).from_dict({**base, **flag})
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(LowbitError, match=why):
        rotate_model(model, RotateOptions())
    assert fitted_rotation(RotateOptions(if_possible=True), model) is None


def _renamed(model, model_type: str):
    """``model`` under a model type lowbit does not name (its twin: the same class)."""
    model.config.model_type = model_type
    return model


class _TanhEmbeddings:
    """A Llama whose embeddings pass through tanh: Llama's parts, but a stream a rotation
    does not commute with."""

    @staticmethod
    def build():
        import transformers as tf

        class TanhLlama(tf.LlamaForCausalLM):
            def __init__(self, config):
                super().__init__(config)
                self.model.embed_tokens.register_forward_hook(lambda m, a, out: torch.tanh(out))

        model = TanhLlama(tiny_family_model("llama").config)
        return _renamed(model, "tanh-llama")


def test_an_unnamed_family_finds_its_norm_offset_on_the_twin():
    """A Gemma under another name: the twin shows its norms scale by 1 + w."""
    model = _renamed(tiny_family_model("gemma"), "gemma-like")
    _perturb_norms(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(model, RotateOptions(heads=True, online=("down_proj",)))
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.zeros_like(norm))


def test_a_model_of_llama_parts_that_computes_more_is_refused_before_any_change():
    from lowbit.models.rotate import fitted_rotation

    model = _TanhEmbeddings.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match="small 'tanh-llama' changed its logits"):
        rotate_model(model, RotateOptions())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fitted_rotation(RotateOptions(if_possible=True), model) is None


def test_an_unnamed_family_rotates_streamed_as_in_memory(tmp_path):
    from helpers import make_tokenizer

    model = tiny_family_model("granite")
    _perturb_norms(model)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    rotate = RotateOptions(heads=True, online=("down_proj",))
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=rotate)  # fmt: skip
    streamed, _ = api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "s", progress=False)
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(ids).logits
        api.quantize(model, recipe, progress=False)
        mem = model(ids).logits
        got = api.load(streamed, kernels=False).model(ids).logits
    assert rel(got, mem) < 1e-5 and rel(mem, float_logits) < 0.05


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_a_mixture_rotates_with_its_experts_and_routers(kind):
    """Each expert's gate/up read the turned stream and its down_proj writes to it, turned
    online at the experts' width (Qwen2-MoE's shared expert at its own: 64 against 32); the
    routers and the shared expert's gate are turned too, so the same experts run. DeepSeek
    V3's latent attention reads the stream through q_a_proj and kv_a_proj_with_mqa, and its
    values (kv_b_proj's rows after each head's key part) turn by the head matrix."""
    from helpers import tiny_moe
    from lowbit.nn.online import online_transform

    model = tiny_moe(kind)
    _perturb_norms(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        router = model.model.layers[1].mlp.gate.weight.clone()
        values = model.model.layers[1].self_attn.get_parameter(
            "kv_b_proj.weight" if kind == "deepseek_v3" else "v_proj.weight").clone()  # fmt: skip
        rotate_model(model, RotateOptions(online=("down_proj",)))
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    mlp = model.model.layers[1].mlp
    downs = [m for n, m in mlp.named_modules() if n.endswith("down_proj")]
    assert len(downs) == mlp.experts.num_experts + (kind in ("qwen2_moe", "deepseek_v3"))
    assert all(online_transform(m) is not None for m in downs)
    assert (mlp.gate.weight - router).abs().max() > 1e-3  # the router reads the turned stream
    attn = model.model.layers[1].self_attn
    turned = attn.kv_b_proj.weight if kind == "deepseek_v3" else attn.v_proj.weight
    assert (turned - values).abs().max() > 1e-3  # the values, by the head matrix


@pytest.mark.parametrize("kind", ["hadamard", "learned"])
def test_a_streamed_mixture_rotates_as_in_memory(kind, tmp_path):
    """Mixtral's checkpoint names (block_sparse_moe, w1/w3/w2) read through the rotation, its
    experts' GPTQ with online transforms: the same model streamed as in memory."""
    from helpers import make_tokenizer, tiny_moe
    from lowbit.calibration import CalibrationSet

    model = tiny_moe("mixtral")
    _perturb_norms(model)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    calibration = CalibrationSet("test", 8, 16, 0, ids)
    rotate = RotateOptions(kind=kind, steps=2, online=("down_proj",))
    recipe = dataclasses.replace(make_recipe({"bits": 4, "group_size": 32, "symmetric": True}),
                                 rotate=rotate, algorithm="gptq")  # fmt: skip
    streamed, _ = api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "s",
                                  calibration=calibration, progress=False)  # fmt: skip
    api.quantize(model, recipe, calibration=calibration, progress=False)
    with torch.no_grad():
        mem = model(ids[:2]).logits
        got = api.load(streamed, kernels=False).model(ids[:2]).logits
    assert rel(got, mem) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2", "glm4"])
@pytest.mark.parametrize("options", [{}, {"heads": False}, {"online": ("down_proj",)}])
def test_a_decoder_with_post_norms_turns_their_outputs_at_run_time(family, options, tmp_path):
    """Gemma 2/3, OLMo 2 and GLM-4 normalise each sub-block's output before the residual add:
    those norms keep their scales and turn their outputs by the stream's Hadamard matrix at run
    time, the pre-norms fold into their readers (OLMo 2's read the stream itself); the
    model computes the same function, a saved folder reinstalls the transform, and exporters
    refuse it."""
    from lowbit.export import export
    from lowbit.models.rotate_fit import norm_layout
    from lowbit.nn.online import stream_transform

    model = tiny_family_model(family)
    _perturb_norms(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        rotate_model(model, RotateOptions(**options))
        after = model(ids).logits
    assert rel(after, before) < 1e-5
    block = model.model.layers[0]
    pre, post = norm_layout(block)
    assert bool(pre) == (family != "olmo2") and len(post) == 2
    for name in pre:  # folded: w (Gemma: 1 + w, so w = 0)
        weight = getattr(block, name).weight
        assert torch.equal(weight, torch.full_like(weight, 0.0 if "gemma" in family else 1.0))
    for name in post:
        norm = getattr(block, name)
        assert stream_transform(norm) is not None and norm.weight.abs().min() > 0
    if options:
        return
    with pytest.raises(LowbitError, match="not a given matrix"):  # its hooks turn by their own
        rotate_model(tiny_family_model(family), RotateOptions(), orthogonal(64, RotateOptions()))
    recipe = dataclasses.replace(make_recipe({"bits": 8, "group_size": -1, "symmetric": True}),
                                 rotate=RotateOptions())  # fmt: skip
    model = tiny_family_model(family)
    _perturb_norms(model)
    with torch.no_grad():
        report = api.quantize(model, recipe, progress=False)
        folder = api.save(model, tmp_path / "q", report)
        loaded = api.load(folder, kernels=False).model
        assert rel(loaded(ids).logits, model(ids).logits) < 1e-5
    last = loaded.model.layers[1]
    assert stream_transform(getattr(last, norm_layout(last)[1][1])) is not None
    with pytest.raises(LowbitError, match="turns its post-norms' outputs at run time"):
        export(folder, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()

"""LiteRT export, checked in the LiteRT interpreter: codes read back from the file, logits of
the plain forward and of prefill/decode over the KV cache, greedy generation, bad input."""

import logging

import numpy as np
import pytest
import torch

from helpers import make_recipe, quantized_folder, tiny_family_model
from lowbit.errors import LowbitError
from lowbit.export import LiteRTOptions, export
from lowbit.nn import QuantLinear

pytest.importorskip("litert_torch", reason="the litert extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

W4_G32 = {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"}
SHORT = LiteRTOptions(seqlen=16, kv_cache=False)
CACHED = LiteRTOptions(seqlen=16, kv_cache=True, prefill=8, cache=32)


def _codes_by_layer(path):
    """Codes read back from the file, by tensor name."""
    from ai_edge_litert.tools import flatbuffer_utils

    from lowbit.export.litert_codes import read_codes

    return read_codes(flatbuffer_utils.read_model(str(path)))


def _lowbit_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _mixed_recipe():
    """Every exact form at once: int4 g32 (bfloat16 scales), int8 and int4 per channel, and
    int4 / int8 per channel with integer zero points (weight-only)."""
    from lowbit.recipes import Recipe

    channel = {"group_size": -1, "symmetric": True}
    asym = {"group_size": -1, "symmetric": False, "zero_point": "int"}
    return Recipe.from_dict({
        "version": 1, "name": "mixed", "ignore": ["lm_head"], "weights": W4_G32,
        "overrides": [{"match": "re:.*\\.down_proj$", "weights": {"bits": 8, **channel}},
                      {"match": "re:.*\\.o_proj$", "weights": {"bits": 4, **channel}},
                      {"match": "re:.*\\.gate_proj$", "weights": {"bits": 4, **asym}},
                      {"match": "re:.*\\.up_proj$", "weights": {"bits": 8, **asym}}],
    })  # fmt: skip


@pytest.fixture(scope="module")
def cached_export(tmp_path_factory):
    """A tiny Llama in every exact form, exported with a KV cache (shared: each conversion
    takes seconds)."""
    from helpers import make_tokenizer

    tmp = tmp_path_factory.mktemp("litert")
    src = tmp / "tiny"
    tiny_family_model("llama", vocab=64).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    folder, qmodel = quantized_folder(src, tmp / "q", _mixed_recipe())
    result = export(folder, "litert", tmp / "model.tflite", litert=CACHED)
    return result, qmodel


def test_codes_in_the_file_are_lowbits(cached_export):
    from lowbit.export.litert_codes import encode

    result, model = cached_export
    kinds = result.tensor_types
    assert kinds["model.layers.0.self_attn.q_proj"] == "int4-g32"
    assert kinds["model.layers.0.mlp.down_proj"] == "int8-channel"
    assert kinds["model.layers.1.self_attn.o_proj"] == "int4-channel"
    assert kinds["model.layers.1.mlp.gate_proj"] == "int4-channel-asym"  # DEQUANTIZE, float FC
    assert kinds["model.layers.0.mlp.up_proj"] == "int8-channel-asym"
    layers = _lowbit_layers(model)
    assert set(kinds) == set(layers) and len(layers) == 14
    stored = list(_codes_by_layer(result.path).values())
    for name, mod in layers.items():
        enc = encode(mod, name)
        assert any(e.same(enc) for e in stored), f"{name}: not in the file"


def test_forward_and_cached_steps_match_lowbit(cached_export):
    _forward_and_steps_match(*cached_export)


def test_phi3s_fused_projections_export_with_a_kv_cache(tmp_path):
    """Phi-3's q/k/v rows in one weight: the cached steps split them as its attention does."""
    from helpers import make_tokenizer

    src = tmp_path / "phi3"
    tiny_family_model("phi3", vocab=64).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    folder, qmodel = quantized_folder(src, tmp_path / "q", make_recipe(W4_G32))
    _forward_and_steps_match(export(folder, "litert", tmp_path / "m.tflite", litert=CACHED),
                             qmodel)  # fmt: skip


def _internlm3():
    """InternLM3, a family lowbit does not name, at random init."""
    import transformers as tf

    config = tf.InternLM3Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config)


def test_a_family_with_llamas_arithmetic_gets_cached_steps():
    """InternLM3's tiny twin shows Llama's arithmetic, so it gets the cached steps too (the
    export itself is checked in the slow test below)."""
    from lowbit.export.litert_graph import cache_reason

    assert cache_reason(_internlm3(), 64) is None


@pytest.mark.slow  # ~17 s; CI exports Llama and Phi-3 with a KV cache
def test_a_family_with_llamas_arithmetic_exports_with_a_kv_cache(tmp_path):
    """InternLM3's export runs its cached steps as its forward does."""
    from helpers import make_tokenizer

    src = tmp_path / "internlm3"
    _internlm3().save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    folder, qmodel = quantized_folder(src, tmp_path / "q", make_recipe(W4_G32))
    _forward_and_steps_match(export(folder, "litert", tmp_path / "m.tflite", litert=CACHED),
                             qmodel)  # fmt: skip


def test_post_norm_blocks_get_no_cached_steps():
    """OLMo 2 runs on the compact forward, but the cached steps are Llama's pre-norm blocks."""
    from lowbit.export.litert_graph import cache_reason

    assert "post-norm" in cache_reason(tiny_family_model("olmo2"), 64)


def _forward_and_steps_match(result, model):
    from lowbit.models.litert import LiteRTModel

    lite = LiteRTModel(result.path)
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits[0]
    theirs = lite(ids).logits[0]
    # dynamic int8 activations: about 1% of the logits' spread, never a different model
    spread = ours.std().item()
    assert (theirs - ours).abs().max().item() < 0.05 * spread
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.9
    # prefill (a prompt shorter than the chunk, right-padded) then decode reproduce the
    # forward's logits position by position: the cache holds what the forward computes
    from lowbit.runtime.litert_forward import LiteRTForward

    fwd = LiteRTForward(lite)
    cache = fwd.new_cache(1, 16)
    step_logits = [fwd(ids[:, :5], cache)]
    for j in range(5, 16):
        step_logits.append(fwd(ids[:, j : j + 1], cache))
    steps = torch.cat(step_logits)  # positions 4..15
    np.testing.assert_allclose(steps.numpy(), theirs[4:].numpy(), atol=1e-4, rtol=0)


def test_the_file_generates_within_its_cache_and_stops_where_its_folder_does(cached_export):
    """Its KV cache (32 slots), not the model's context (256), bounds a generation (chat's
    trimming and the server's room read it); its end-of-sequence ids are the folder's."""
    from lowbit.models.litert import LiteRTModel
    from lowbit.runtime import Runtime
    from lowbit.runtime.text import stop_ids

    result, model = cached_export
    lite = LiteRTModel(result.path)
    assert Runtime(lite).context == 32 and Runtime(model).context == 256
    assert stop_ids(None, lite) == stop_ids(None, model) != []


def test_eval_names_the_files_window_first(cached_export, capsys):
    """A window other than the export's is refused with the one that works (the model's
    context check came first and told the user to lower --seqlen, then to raise it)."""
    from lowbit.cli import main

    result, _ = cached_export
    assert main(["eval", str(result.path), "--seqlen", "2048"]) == 2
    assert "scores windows of 16 tokens (its export's --seqlen); evaluate with --seqlen 16" in (
        capsys.readouterr().err
    )
    assert main(["eval", str(result.path), "--seqlen", "16", "--kv-bits", "8"]) == 2
    assert "a .tflite runs the float KV cache its export wrote" in capsys.readouterr().err


def test_generate_on_the_tflite_follows_lowbit(cached_export):
    from lowbit.models.litert import LiteRTModel
    from lowbit.runtime import Runtime

    result, model = cached_export
    prompt = [5, 9, 2, 33, 17, 8, 40, 11, 3, 21]  # longer than one prefill chunk of 8
    ours = Runtime(model).generate([prompt], 12)
    theirs = Runtime(LiteRTModel(result.path)).generate([prompt], 12)
    assert theirs.path == "litert" and len(theirs.tokens[0]) == 12
    # teacher-forced: lowbit's logits along LiteRT's own greedy path pick the same tokens
    seq = torch.tensor([prompt + theirs.tokens[0]])
    with torch.no_grad():
        picks = model(seq).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    agree = np.mean([a == b for a, b in zip(picks, theirs.tokens[0], strict=True)])
    assert agree >= 0.9, (ours.tokens, theirs.tokens)


def test_a_format_litert_cannot_hold_is_refused_whole(tiny_folder, tmp_path):
    folder, _ = quantized_folder(
        tiny_folder, tmp_path / "q", make_recipe({"bits": 4, "group_size": 32})
    )  # fmt: skip  (asymmetric)
    out = tmp_path / "m.tflite"
    with pytest.raises(LowbitError, match=r"model\.layers\.0\..*asymmetric codes other than"):
        export(folder, "litert", out, litert=SHORT)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["q", "tiny-llama"]


@pytest.mark.parametrize(
    ("family", "options", "says"),
    [("gpt2", CACHED, "no KV-cache export.*gpt2"),
     # Falcon's single key/value head: the converted graph's logits past position 0 differ
     # from the model's, so no file is written
     ("falcon", SHORT, "computes this falcon model differently.*ONNX")],
)  # fmt: skip
def test_a_family_the_export_cannot_carry_is_refused(tmp_path, family, options, says):
    from helpers import make_tokenizer

    src = tmp_path / family
    tiny_family_model(family).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    folder, _ = quantized_folder(src, tmp_path / "q", make_recipe(W4_G32))
    with pytest.raises(LowbitError, match=says):
        export(folder, "litert", tmp_path / "m.tflite", litert=options)
    assert not (tmp_path / "m.tflite").exists()


def test_float16_block_scales_are_refused_or_rounded_to_bfloat16(
    tiny_folder, tmp_path, caplog, capsys
):
    """XNNPACK computes int4 blocks with bfloat16 scales: float16 ones would not run as
    stored, so they are an error, or with --requantize the codes stay and the scales round."""
    weights = {"bits": 4, "group_size": 32, "symmetric": True}  # float16 scales
    folder, model = quantized_folder(tiny_folder, tmp_path / "q", make_recipe(weights))
    with pytest.raises(LowbitError, match="bfloat16 does not hold.*w4-sym-g32-bf16"):
        export(folder, "litert", tmp_path / "m.tflite", litert=SHORT)
    with caplog.at_level(logging.WARNING):
        result = export(folder, "litert", tmp_path / "m.tflite", requantize="int8", litert=SHORT)
    assert set(result.tensor_types.values()) == {"int4-g32"}
    stored = list(_codes_by_layer(result.path).values())
    for name, mod in _lowbit_layers(model).items():
        assert any(np.array_equal(e.codes, mod.int8_codes().numpy()) for e in stored), name
    assert caplog.text.count("requantized") == len(_lowbit_layers(model))
    # a scoring-only export cannot generate: serve refuses it before listening
    import socket

    from lowbit.cli import main

    with socket.socket() as free:  # a port free a moment ago
        free.bind(("127.0.0.1", 0))
        number = free.getsockname()[1]
    capsys.readouterr()
    assert main(["serve", str(result.path), "--port", str(number)]) == 2
    assert "has no KV-cache signatures; re-export it with --kv-cache" in capsys.readouterr().err

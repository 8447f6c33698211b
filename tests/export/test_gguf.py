"""GGUF export: exact block encodings (the gguf package's reader is the oracle), and a full
round trip through transformers' GGUF loader (architecture keys, rotary row order, tokenizer)."""

import gguf
import numpy as np
import pytest
import torch

from helpers import (
    gguf_reads_back_the_same,
    make_bpe_tokenizer,
    make_recipe,
    quantized_folder,
    tiny_family_model,
)
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.export.gguf_file import _rotary_rows
from lowbit.nn import QuantLinear

EXACT = {
    "q4_1": ({"bits": 4, "group_size": 32}, "Q4_1"),
    "q4_0": ({"bits": 4, "group_size": 32, "symmetric": True}, "Q4_0"),
    "q8_0": ({"bits": 8, "group_size": 32, "symmetric": True}, "Q8_0"),
    # bfloat16-valued scales (what LiteRT's blocks need) are float16 values too: still exact
    "q4_0-bf16": (
        {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"},
        "Q4_0",
    ),
    # 16-bit float layers: their values as they are
    "f16": ({"format": "fp16", "bits": 16}, "F16"),
    "bf16": ({"format": "bf16", "bits": 16}, "BF16"),
}


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def bpe_folder(request, tmp_path):
    if request.param == "qwen3":  # transformers' GGUF reader takes Qwen3's default head size
        from transformers import Qwen3Config

        model = _tiny(Qwen3Config, head_dim=128)  # q/k norms; heads x 128 is not the width
    else:
        model = tiny_family_model(request.param, vocab=len(make_bpe_tokenizer()))
    return _bpe_folder(model, tmp_path / f"tiny-{request.param}")


def _bpe_folder(model, folder):
    model.save_pretrained(folder)
    make_bpe_tokenizer().save_pretrained(folder)
    return folder


def _tiny(config_class, **extra):
    """A 2-block random model of a family lowbit does not name, its norms perturbed."""
    from transformers import AutoModelForCausalLM

    config = config_class(vocab_size=len(make_bpe_tokenizer()), hidden_size=64,
                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _gguf_tensors(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("kind", list(EXACT))
def test_blocks_dequantize_to_lowbit_weights_exactly(bpe_folder, tmp_path, kind):
    weights, type_name = EXACT[kind]
    folder, model = quantized_folder(bpe_folder, tmp_path / "q", make_recipe(weights))
    path = export(folder, "gguf", tmp_path / "m.gguf").path
    reader, tensors = _gguf_tensors(path)
    cfg = model.config
    checked = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        block = int(name.split(".")[2])
        short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj":
                 "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                 "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]  # fmt: skip
        t = tensors[f"blk.{block}.{short}.weight"]
        assert t.tensor_type.name == type_name
        ours = mod.dequantized_weight()
        if cfg.model_type == "llama" and short in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if short == "attn_q" else cfg.num_key_value_heads
            ours = ours[_rotary_rows(mod.out_features, heads)]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(theirs, ours.numpy())
        checked += 1
    assert checked == 7 * cfg.num_hidden_layers
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == cfg.num_hidden_layers
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == cfg.vocab_size


def test_transformers_reads_the_file_back_with_the_same_logits(bpe_folder, tmp_path):
    folder, model = quantized_folder(bpe_folder, tmp_path / "q", make_recipe(EXACT["q4_1"][0]))
    gguf_reads_back_the_same(export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path,
                         model)  # fmt: skip


def test_off_grid_recipe_is_a_clear_error_unless_requantized(bpe_folder, tmp_path):
    folder, _ = quantized_folder(bpe_folder, tmp_path / "q", "w4-rtn-g64")
    with pytest.raises(LowbitError, match=r"q_proj: group blocks of 64 .*Q4_1"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []
    path = export(folder, "gguf", tmp_path / "m.gguf", requantize="q8_0").path
    _, tensors = _gguf_tensors(path)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"


@pytest.mark.parametrize(
    ("recipe", "head_type"), [("w4-sym-g32-head8", "Q8_0"), ("w4-sym-g32-head16", "F16")]
)
@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_head_is_written_as_the_output_tensor(tmp_path, tied, recipe, head_type):
    """``w4-sym-g32-head8``: the head's own Q8_0 codes become ``output.weight`` (which llama.cpp
    prefers to the embeddings when present), the embeddings stay float, tied or not;
    ``w4-sym-g32-head16``: its float16 values, as F16."""
    tok = make_bpe_tokenizer()
    model = tiny_family_model("llama", vocab=len(tok))
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    folder, q = quantized_folder(src, tmp_path / "q", recipe)
    path = export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path
    _, tensors = _gguf_tensors(path)
    head, embd = tensors["output.weight"], tensors["token_embd.weight"]
    assert head.tensor_type.name == head_type
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
    theirs = gguf.quants.dequantize(head.data, head.tensor_type)
    np.testing.assert_array_equal(theirs, q.lm_head.dequantized_weight().numpy())
    embedding = q.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(gguf.quants.dequantize(embd.data, embd.tensor_type), embedding)


def test_a_family_with_llamas_arithmetic_goes_out_as_llama(tmp_path):
    """InternLM3 (a name llama.cpp's LLAMA graph does not know, the arithmetic it has: its tiny
    twin shows it): written as ``llama``, read back by transformers with the same logits."""
    from transformers import InternLM3Config

    src = _bpe_folder(_tiny(InternLM3Config), tmp_path / "src")
    folder, model = quantized_folder(src, tmp_path / "q", make_recipe(EXACT["q4_0"][0]))
    path = export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path
    reader, _ = _gguf_tensors(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    gguf_reads_back_the_same(path, model)


def test_qwen3_records_its_head_size_for_llama_cpp(tmp_path):
    """heads x head size (4 x 128) is not the width (64): llama.cpp reads the head size from
    ``key_length`` / ``value_length`` (transformers' reader does not, so it cannot tell)."""
    from transformers import Qwen3Config

    src = _bpe_folder(_tiny(Qwen3Config, head_dim=128), tmp_path / "src")
    folder, _ = quantized_folder(src, tmp_path / "q", make_recipe(EXACT["q4_0"][0]))
    reader, _ = _gguf_tensors(export(folder, "gguf", tmp_path / "m.gguf").path)
    assert reader.fields["qwen3.attention.key_length"].contents() == 128
    assert reader.fields["qwen3.attention.value_length"].contents() == 128


def test_settings_llama_cpps_graph_does_not_follow_are_a_clear_error(tmp_path):
    """llama.cpp's Llama graph gates with SiLU and scales attention by 1/sqrt(head size)."""
    from transformers import LlamaConfig

    model = _tiny(LlamaConfig, hidden_act="gelu_pytorch_tanh")
    folder, _ = quantized_folder(_bpe_folder(model, tmp_path / "src"), tmp_path / "q",
                                 make_recipe(EXACT["q4_0"][0]))  # fmt: skip
    with pytest.raises(LowbitError, match="SiLU; this model uses gelu_pytorch_tanh"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


@pytest.mark.parametrize(
    ("settings", "says"),
    [  # 1/sqrt(16) attention scale: only the multipliers differ from a Llama's
        ({"embedding_multiplier": 2.0, "logits_scaling": 3.0, "attention_multiplier": 0.25},
         "computes more than a Llama"),
        # not as if llama.cpp's own graph for the family gated with SiLU
        ({"hidden_act": "gelu"}, "its MLP uses gelu, not SiLU"),
    ],
)  # fmt: skip
def test_a_family_without_llamas_arithmetic_is_a_clear_error(tmp_path, settings, says):
    from transformers import GraniteConfig

    granite = _tiny(GraniteConfig, **settings)
    folder, _ = quantized_folder(_bpe_folder(granite, tmp_path / "src"), tmp_path / "q",
                                 make_recipe(EXACT["q4_0"][0]))  # fmt: skip
    with pytest.raises(LowbitError, match=f"'granite' is not one: .*{says}"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


def test_latent_attention_is_refused_for_its_layout_not_its_head_size(tmp_path):
    """DeepSeek's latent attention has no q/k/v projections; its config's head_dim is the
    rotary part, which a scale check would misreport."""
    from helpers import tiny_moe

    folder, _ = quantized_folder(_bpe_folder(tiny_moe("deepseek_v3"), tmp_path / "src"),
                                 tmp_path / "q", make_recipe(EXACT["q4_0"][0]))  # fmt: skip
    with pytest.raises(LowbitError, match="'deepseek_v3' is not one: its blocks lack a Llama"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


def _sentencepiece_folder(folder, family="llama", specials=()):
    """A tiny model with a SentencePiece BPE tokenizer (byte fallback), as Llama 2 and Phi-3
    ship one; ``specials``: added special tokens (Phi-3's, which llama.cpp looks up)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    from helpers import TEXT

    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(" . ")), model_prefix=str(folder / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)  # fmt: skip
    tok = LlamaTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tiny_family_model(family, vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def test_a_sentencepiece_tokenizer_goes_out_as_llamas(tmp_path):
    """Tokens in id order scored by their merge order (minus the id: what llama.cpp's
    SentencePiece tokenizer merges by), bytes and controls typed, read back by transformers
    with the same ids (bytes included) and logits."""
    from transformers import AutoTokenizer

    tok = _sentencepiece_folder(tmp_path / "src")
    folder, model = quantized_folder(tmp_path / "src", tmp_path / "q",
                                     make_recipe(EXACT["q4_0"][0]))  # fmt: skip
    path = export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path
    reader, _ = _gguf_tensors(path)
    fields = {k: reader.fields[f"tokenizer.ggml.{k}"].contents()
              for k in ("model", "tokens", "scores", "token_type")}  # fmt: skip
    assert fields["model"] == "llama" and fields["tokens"][:3] == ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType(t) for t in fields["token_type"]]
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    assert len(normal) > 30 and all(fields["scores"][i] == -i for i in normal)
    assert types[tok.get_vocab()["<0x0A>"]] == gguf.TokenType.BYTE
    assert types[1] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.UNKNOWN
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("the quick brown fox", "héllo wörld ✓ 42", "glittersnine"):
        assert back(text)["input_ids"] == tok(text)["input_ids"]
    gguf_reads_back_the_same(path, model)


def test_phi3_goes_out_with_its_fused_projections(tmp_path, caplog):
    """Phi-3's fused q/k/v and gate/up weights as llama.cpp's attn_qkv and ffn_up, read back by
    transformers with the same logits; a sliding window is recorded, with a warning that
    llama.cpp runs Phi-3 without it."""
    specials = ("<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")
    _sentencepiece_folder(tmp_path / "src", "phi3", specials)
    folder, model = quantized_folder(tmp_path / "src", tmp_path / "q",
                                     make_recipe(EXACT["q4_1"][0]))  # fmt: skip
    path = export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path
    reader, tensors = _gguf_tensors(path)
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(tensors)
    gguf_reads_back_the_same(path, model)
    model.config.sliding_window = 8
    model.config.save_pretrained(folder)
    with caplog.at_level("WARNING"):
        path = export(folder, "gguf", tmp_path / "w.gguf", float_type="f32").path
    assert gguf.GGUFReader(str(path)).fields["phi3.attention.sliding_window"].contents() == 8
    assert "without its sliding window" in caplog.text


def test_embedding_rows_past_the_tokenizer_are_padding_tokens(tmp_path):
    """A model whose embeddings have more rows than its tokenizer has tokens (Qwen2's 151,936
    for 151,665): llama.cpp counts the vocabulary by the token list, so it is padded."""
    n = len(make_bpe_tokenizer())
    folder = _bpe_folder(tiny_family_model("llama", vocab=n + 5), tmp_path / "src")
    folder, _ = quantized_folder(folder, tmp_path / "q", make_recipe(EXACT["q4_0"][0]))
    reader, _ = _gguf_tensors(export(folder, "gguf", tmp_path / "m.gguf").path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == n + 5 and tokens[-5:] == [f"[PAD{i}]" for i in range(5)]


def test_post_norm_blocks_are_a_clear_error():
    """OLMo 2 runs on the compact forward (its twin agrees) but its blocks are post-norm,
    which llama.cpp's LLAMA graph is not."""
    from lowbit.export.gguf_file import _arch

    with pytest.raises(LowbitError, match="'olmo2' is not one: its blocks are post-norm"):
        _arch(tiny_family_model("olmo2"))


def test_requantize_touches_only_the_layers_gguf_cannot_hold(bpe_folder, tmp_path):
    from lowbit.recipes import Recipe

    wider = [{"match": "re:.*down_proj", "weights": {"bits": 4, "group_size": 64}}]
    recipe = Recipe.from_dict({"version": 1, "weights": EXACT["q4_1"][0], "ignore": ["lm_head"],
                               "overrides": wider})  # fmt: skip
    folder, _ = quantized_folder(bpe_folder, tmp_path / "q", recipe)
    _, tensors = _gguf_tensors(export(folder, "gguf", tmp_path / "m.gguf", requantize="q8_0").path)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"  # exact: kept
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"  # re-quantized


def test_quantized_activations_are_refused(bpe_folder, tmp_path):
    acts = {"bits": 8, "granularity": "token", "dynamic": True}
    folder, _ = quantized_folder(bpe_folder, tmp_path / "q",
                                 make_recipe(EXACT["q8_0"][0], acts))  # fmt: skip
    with pytest.raises(LowbitError, match="8-bit activations have no GGUF form"):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()

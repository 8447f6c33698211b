"""Mixtures of experts in GGUF: each block's experts stacked per projection in their exact
blocks, routers in float32, the experts' counts in the metadata; transformers' GGUF reader
reads a Qwen3-MoE back to the same logits, and what llama.cpp's graphs would compute otherwise
is a one-line error."""

import gguf
import numpy as np
import pytest
import torch

from helpers import gguf_reads_back_the_same, make_bpe_tokenizer, make_recipe, quantized_folder
from lowbit.errors import LowbitError
from lowbit.export import export

Q4_0 = {"bits": 4, "group_size": 32, "symmetric": True}


def _mixture(kind: str, **extra):
    import transformers as tf

    common = {"vocab_size": len(make_bpe_tokenizer()), "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256}  # fmt: skip
    configs = {  # Qwen3-MoE at its default expert width: transformers' GGUF reader assumes it
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, head_dim=16, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=True),
        "olmoe": lambda: tf.OlmoeConfig(**common, intermediate_size=64, num_experts=4,
                                        num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
        "mixtral": lambda: tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=4,
                                            num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, moe_intermediate_size=64,
                                               shared_expert_intermediate_size=64, num_experts=4,
                                               num_experts_per_tok=2),
    }  # fmt: skip
    config = configs[kind]()
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _folder(model, tmp_path, weights=Q4_0, ignore=("lm_head",)):
    model.save_pretrained(tmp_path / "src")
    make_bpe_tokenizer().save_pretrained(tmp_path / "src")
    return quantized_folder(tmp_path / "src", tmp_path / "q", make_recipe(weights, ignore=ignore))


def test_experts_are_stacked_in_their_exact_blocks(tmp_path):
    folder, model = _folder(_mixture("mixtral"), tmp_path)
    path = export(folder, "gguf", tmp_path / "m.gguf").path
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router
    for part, short in (("gate_proj", "ffn_gate_exps"), ("down_proj", "ffn_down_exps")):
        t = tensors[f"blk.1.{short}.weight"]
        assert t.tensor_type.name == "Q4_0"
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)  # (experts, rows, columns)
        experts = model.model.layers[1].mlp.experts
        ours = torch.stack([getattr(experts.get_submodule(str(e)), part).dequantized_weight()
                            for e in range(4)])  # fmt: skip
        np.testing.assert_array_equal(theirs, ours.numpy())


def test_transformers_reads_a_qwen3_mixture_back_with_the_same_logits(tmp_path):
    folder, model = _folder(_mixture("qwen3_moe"), tmp_path)
    gguf_reads_back_the_same(export(folder, "gguf", tmp_path / "m.gguf", float_type="f32").path,
                             model)  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "why"),
    [({"norm_topk_prob": False}, "renormalises the top-k routing weights.*False"),
     ({"mlp_only_layers": [0]}, "every block a mixture; this model has 1 dense blocks")],
)  # fmt: skip
def test_mixtures_llama_cpp_would_compute_otherwise_are_a_clear_error(tmp_path, extra, why):
    folder, _ = _folder(_mixture("qwen3_moe", moe_intermediate_size=32, **extra), tmp_path)
    with pytest.raises(LowbitError, match=why):
        export(folder, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_olmoe_with_grouped_keys_is_a_clear_error(tmp_path):
    folder, _ = _folder(_mixture("olmoe"), tmp_path)  # 2 key/value heads for 4 heads
    with pytest.raises(LowbitError, match="olmoe graph normalises the keys over 4 heads"):
        export(folder, "gguf", tmp_path / "m.gguf")


def test_a_block_of_experts_in_two_formats_is_a_clear_error(tmp_path):
    """One expert left float (ignored) beside Q4_0 ones: one GGUF type per stacked tensor."""
    ignore = ("lm_head", "model.layers.0.mlp.experts.2.up_proj")
    folder, _ = _folder(_mixture("mixtral"), tmp_path, ignore=ignore)
    with pytest.raises(LowbitError, match="its experts are stored as .*one format"):
        export(folder, "gguf", tmp_path / "m.gguf")


def test_the_shared_experts_gate_is_a_vector(tmp_path):
    """Qwen2-MoE's shared-expert gate (1, hidden) is written as llama.cpp's files hold it, a
    vector (transformers' GGUF reader refused the 2-D form)."""
    folder, _ = _folder(_mixture("qwen2_moe"), tmp_path)
    path = export(folder, "gguf", tmp_path / "m.gguf").path
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    gate = tensors["blk.1.ffn_gate_inp_shexp.weight"]
    assert gate.tensor_type.name == "F32" and list(gate.shape) == [64]

"""Weights lowbit cannot quantize yet are an error before any work, never a silent float."""

import pytest
import torch
from torch import nn

from helpers import make_recipe, make_tokenizer
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models.normalize import refuse_fused_experts
from lowbit.nn import QuantLinear


def _mixtral():
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_experts_in_3d_tensors_are_refused_in_memory_and_streamed(tmp_path):
    """transformers 5 holds Mixtral's experts as 3-D tensors (saved per expert on disk): the
    linears alone would have been quantized and the experts, most of the model, left float."""
    recipe = make_recipe({"bits": 4, "group_size": 32})
    model = _mixtral()
    with pytest.raises(LowbitError, match=r"mixtral: 4 expert weights .*mixture-of-experts"):
        api.quantize(model, recipe, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    with pytest.raises(LowbitError, match="mixture-of-experts"):
        api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LowbitError, match="mixture-of-experts"):  # --dry-run
        api.estimate(str(tmp_path / "src"), recipe)
    with pytest.raises(LowbitError, match="mixture-of-experts"):
        api.qat(model, recipe, train=None)


def test_experts_stacked_in_2d_matrices_are_refused():
    """DBRX keeps each projection's experts stacked in one 2-D parameter."""
    import transformers as tf

    config = tf.DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=64,
                           ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4,
                                       "moe_top_k": 2},
                           attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(LowbitError, match=r"dbrx: .*experts\.mlp\.w1"):
        refuse_fused_experts(model)


def test_other_3d_parameters_are_not_experts():
    """A ViT's class token and position table are 3-D: not experts."""
    import transformers as tf

    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    image_size=16, patch_size=8))  # fmt: skip
    assert any(p.dim() == 3 for p in vit.parameters())
    refuse_fused_experts(vit)


def test_convolutions_over_one_axis_are_not_experts():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ConvTranspose1d(8, 4, 3), nn.Linear(4, 4))
    refuse_fused_experts(model)  # 3-D weights of convolutions: no error
    model.experts = nn.Module()
    model.experts.w = nn.Parameter(torch.zeros(2, 4, 4))
    with pytest.raises(LowbitError, match=r"experts\.w"):
        refuse_fused_experts(model)

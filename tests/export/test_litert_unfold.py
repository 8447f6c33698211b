"""A multiplier the LiteRT converter folds into the layer before it (OPT's query scaling,
Granite's residual multiplier) is found and restored as a MUL, so the file holds lowbit's codes
and computes what lowbit computes."""

import numpy as np
import pytest
import torch

from helpers import make_recipe, quantized_folder, tiny_family_model
from lowbit.export.litert_unfold import row_factor

# what LiteRT's dynamic FULLY_CONNECTED computes: lowbit's model then equals the file's
A8 = {"bits": 8, "granularity": "token", "dynamic": True, "symmetric": False}


def test_row_factor_reads_back_the_converters_float32_product():
    gen = np.random.default_rng(0)
    w = gen.standard_normal((48, 40)).astype(np.float32)
    w[5] = 0  # a row of zeros takes the factor most rows share
    c = np.full(48, np.float32(20**-0.5))
    c[:3] = np.float32(1.37)  # per-row factors too
    folded = w * c[:, None]  # float32, rounded once per element as the converter rounds
    assert np.array_equal(row_factor(folded, w), c)
    assert np.array_equal(row_factor(w, w), np.ones(48, np.float32))


def test_row_factor_refuses_anything_but_a_positive_per_row_multiple():
    gen = np.random.default_rng(1)
    w = gen.standard_normal((16, 32)).astype(np.float32)
    near = w * np.float32(0.3)
    near[7, 3] = np.nextafter(near[7, 3], np.float32(9))  # one element off by one step
    assert row_factor(near, w) is None
    assert row_factor(-w, w) is None  # a negative multiple flips the codes' meaning
    assert row_factor(w * np.linspace(1, 2, 32, dtype=np.float32), w) is None  # columns
    assert row_factor(w[:, :16], w) is None


def _export_matches(tmp_path, model):
    from ai_edge_litert.tools import flatbuffer_utils

    from helpers import make_tokenizer
    from lowbit.export import LiteRTOptions, export
    from lowbit.export.litert_codes import encode, read_codes
    from lowbit.models.litert import LiteRTModel
    from lowbit.nn import QuantLinear

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained norms are not ones: a fold of those would show too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    src = tmp_path / "src"
    model.save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    recipe = make_recipe({"bits": 4, "group_size": -1, "symmetric": True}, A8)
    folder, qmodel = quantized_folder(src, tmp_path / "q", recipe)
    result = export(folder, "litert", tmp_path / "m.tflite", litert=LiteRTOptions(seqlen=16))
    stored = list(read_codes(flatbuffer_utils.read_model(str(result.path))).values())
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in layers.items():
        assert any(e.same(encode(mod, name)) for e in stored), f"{name}: not in the file"
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = qmodel(ids).logits[0]
    theirs = LiteRTModel(result.path)(ids).logits[0]
    # the same codes, scales and input rounding: float summation order alone differs (a
    # multiplier left folded into the weight's scales, or dropped, shows at 1e-3 and up)
    assert (theirs - ours).abs().max().item() < 1e-4 * ours.abs().max().item()


def test_opts_query_scaling_survives_the_export(tmp_path):
    """OPT multiplies q_proj's output (and bias) by head_dim**-0.5: 20**-0.5 here."""
    pytest.importorskip("litert_torch", reason="the litert extra is not installed")
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(vocab_size=64, hidden_size=80, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=80,
                       max_position_embeddings=256)  # fmt: skip
    _export_matches(tmp_path, tf.OPTForCausalLM(cfg).eval())


@pytest.mark.slow  # ~13 s; CI exports OPT
def test_granites_residual_multiplier_survives_the_export(tmp_path):
    """Granite multiplies o_proj's and down_proj's outputs (no bias) by 0.3."""
    pytest.importorskip("litert_torch", reason="the litert extra is not installed")
    model = tiny_family_model("granite")
    model.config.residual_multiplier = 0.3  # the folder's config: what the export loads
    _export_matches(tmp_path, model)

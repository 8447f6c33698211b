"""Mixture-of-experts models: fused experts become per-expert linears that compute the same,
under the names their checkpoints use; what cannot be turned is an error, never a silent float."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import MOE_SMALL, make_recipe, make_tokenizer, tiny_moe
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.models.experts import (
    LinearExperts,
    RouterLinear,
    checkpoint_renames,
    experts_to_linears,
    refuse_fused_experts,
)
from lowbit.models.twin import tiny_twin, twin_logits
from lowbit.models.wiring import derive_family
from lowbit.nn import QuantLinear


def windows(count: int = 16, length: int = 16, seed: int = 1) -> CalibrationSet:
    ids = torch.randint(0, MOE_SMALL["vocab_size"], (count, length),
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return CalibrationSet("test", count, length, 0, ids)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_fused_experts_become_linears_that_compute_the_same(kind):
    model = tiny_moe(kind)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    assert experts_to_linears(model) == 2  # (DeepSeek: a dense first block, then 2)
    assert not any(p.dim() == 3 for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
    assert experts and all(len(list(e.children())) == e.num_experts for e in experts)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert experts_to_linears(model) == 0  # done once


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_a_decoded_token_takes_the_one_token_path_to_the_same_logits(kind, monkeypatch):
    """One token (a decode step) calls its experts directly, in the loop's order: the same
    logits as transformers' fused experts (float64), and the masked loop is not entered."""
    import copy

    model = tiny_moe(kind, _experts_implementation="eager").double()
    ours = copy.deepcopy(model)
    experts_to_linears(ours)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    calls = []
    direct = LinearExperts._one_token
    monkeypatch.setattr(LinearExperts, "_one_token",
                        lambda self, *a: calls.append(self) or direct(self, *a))  # fmt: skip
    with torch.no_grad():
        want = model(ids[:, :5], use_cache=True)
        want = model(ids[:, 5:], past_key_values=want.past_key_values).logits
        got = ours(ids[:, :5], use_cache=True)
        assert not calls  # a prompt: the loop
        got = ours(ids[:, 5:], past_key_values=got.past_key_values).logits
    assert len(calls) == sum(isinstance(m, LinearExperts) for m in ours.modules())
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12


def test_expert_linears_are_views_and_the_names_transformers_saves(tmp_path):
    """No copy of the experts' weights; the state dict's names are the checkpoint's."""
    model = tiny_moe("qwen3_moe")
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    experts_to_linears(model)
    assert set(model.state_dict()) == saved
    expert = model.model.layers[0].mlp.experts.get_submodule("3")
    assert expert.gate_proj.weight.data_ptr() == fused[3].data_ptr()
    assert torch.equal(expert.up_proj.weight, fused[3, 32:])


def test_mixtral_checkpoint_names_are_renamed_as_transformers_does():
    rename = checkpoint_renames("mixtral")
    moe_block = "model.layers.1.block_sparse_moe"
    assert (
        rename(f"{moe_block}.experts.3.w1.weight")
        == "model.layers.1.mlp.experts.3.gate_proj.weight"
    )
    assert rename(f"{moe_block}.experts.3.w3.weight").endswith("experts.3.up_proj.weight")
    assert rename(f"{moe_block}.experts.3.w2.weight").endswith("experts.3.down_proj.weight")
    assert rename(f"{moe_block}.gate.weight") == "model.layers.1.mlp.gate.weight"
    attention = "model.layers.1.self_attn.q_proj.weight"
    assert rename(attention) == attention
    assert checkpoint_renames("llama")("model.norm.weight") == "model.norm.weight"


def test_routers_stay_float():
    model = tiny_moe("qwen2_moe")
    experts_to_linears(model)
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert type(gate) is RouterLinear
    api.quantize(model, make_recipe({"bits": 4, "group_size": 32}), progress=False)
    assert type(model.model.layers[0].mlp.shared_expert_gate) is RouterLinear
    assert isinstance(model.model.layers[0].mlp.experts.get_submodule("7.down_proj"), QuantLinear)
    assert isinstance(model.model.layers[0].mlp.shared_expert.up_proj, QuantLinear)


def test_a_router_of_an_nn_linear_subclass_stays_float_with_its_forward():
    from lowbit.models import quantizable_layers

    class Gate(nn.Linear):  # (as Ergo's router: its own forward, a linear map)
        def forward(self, x):
            return x @ self.weight.T

    model = tiny_moe("qwen2_moe")
    model.model.layers[0].mlp.shared_expert_gate.__class__ = Gate
    experts_to_linears(model)
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert type(gate) is Gate and gate.keeps_float
    names = [n for n, _ in quantizable_layers(model)]
    assert "model.layers.0.mlp.shared_expert_gate" not in names
    assert "model.layers.0.mlp.shared_expert.up_proj" in names


def test_only_routers_stay_float_when_the_width_equals_the_expert_count():
    """64 experts of a 64-wide model: every expert's down_proj (64 outputs) is quantized."""
    model = tiny_moe("mixtral", num_local_experts=64, num_experts_per_tok=1)
    experts_to_linears(model)
    assert not any(isinstance(m, RouterLinear) for m in model.modules())  # (its router: no linear)
    api.quantize(model, make_recipe({"bits": 4, "group_size": 32}), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert all(isinstance(m, QuantLinear) for m in experts.modules() if isinstance(m, nn.Linear))


def test_a_twin_that_disagrees_refuses_the_model(monkeypatch):
    """An experts module whose arithmetic is not transformers' eager loop (here: gate and up
    swapped) is refused before any weight changes."""
    import transformers.models.mixtral.modeling_mixtral as mm

    def swapped(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            up, gate = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, -1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out

    model = tiny_moe("mixtral")
    monkeypatch.setattr(mm.MixtralExperts, "forward", swapped)
    with pytest.raises(LowbitError, match=r"mixtral: its experts do not compute what"):
        experts_to_linears(model)
    assert isinstance(model.model.layers[0].mlp.experts, mm.MixtralExperts)


def test_the_twin_of_a_latent_attention_mixture_is_small():
    """DeepSeek's twin: 4 experts of width 32 and its latent attention's ranks shrunk."""
    twin = tiny_twin(tiny_moe("deepseek_v3", n_routed_experts=64, moe_intermediate_size=512,
                         kv_lora_rank=128, q_lora_rank=256))  # fmt: skip
    assert sum(p.numel() for p in twin.parameters()) < 200_000
    assert twin_logits(twin).isfinite().all()


def test_experts_groups_keep_their_hessians_within_the_budget(monkeypatch):
    """Experts go to GPTQ in as many groups as keep one group's Hessians within the budget."""
    from lowbit.models import wiring

    model = tiny_moe("mixtral")  # hidden 64, experts' width 64: 32 KiB per Hessian
    experts_to_linears(model)
    block = model.model.layers[0]
    names = [f"mlp.experts.{e}" for e in range(4)]
    monkeypatch.setattr(wiring, "HESSIAN_BUDGET", 4 * 64 * 64 * 8)  # 2 experts' gate and up
    groups = wiring._expert_groups(block, names)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert groups[0] == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                         "mlp.experts.1.gate_proj", "mlp.experts.1.up_proj")  # fmt: skip


def test_experts_wiring_is_fixed_and_never_crosses_experts():
    """Every expert's up -> down fold, whichever experts the traced batch reached, and no
    expert's output feeds another expert's scales."""
    model = tiny_moe("mixtral")
    experts_to_linears(model)
    block = model.model.layers[0]
    hidden = torch.randn(1, 3, 64)  # 3 tokens, 2 experts each: some experts unreached
    position = torch.arange(3)[None]
    cos_sin = model.model.rotary_emb(hidden, position)

    def run():
        return block(hidden, position_embeddings=cos_sin, position_ids=position)[0]

    family = derive_family(block, run)
    folds = {(g.prev, g.linears) for g in family.scale_groups if "experts" in g.prev}
    assert folds == {(f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",))
                     for e in range(4)}  # fmt: skip
    flat = [n for g in family.sequential for n in g]
    experts_groups = [g for g in family.sequential if "experts" in g[0]]
    assert len(experts_groups) == 2  # all gate/up, then all down: one pass each
    assert all(
        f"mlp.experts.{e}.{p}_proj" in flat for e in range(4) for p in ("gate", "up", "down")
    )


def test_a_streamed_mixtral_is_quantized_as_in_memory(tmp_path, caplog):
    """Mixtral's checkpoint keeps older names (block_sparse_moe, w1/w3/w2): streamed GPTQ reads
    them into the per-expert linears and gives the in-memory model's codes; an expert that no
    calibration token reaches is rounded without data."""
    model = tiny_moe("mixtral")
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        assert any("block_sparse_moe.experts.0.w1" in k for k in f.keys())  # noqa: SIM118
    recipe = api.load_recipe("w4-gptq-g64")
    calib = windows(count=2, length=2)  # 4 tokens: some experts see none
    with caplog.at_level("INFO", logger="lowbit.calibration.runner"):
        api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "out", calib, progress=False)
    assert "linears of experts saw no calibration token" in caplog.text
    streamed = api.load(tmp_path / "out", kernels=False).model
    api.quantize(model, recipe, calib, progress=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, model(ids).logits)
    assert sum(isinstance(m, QuantLinear) for m in streamed.modules()) == 2 * (4 + 4 * 3)


def test_onnx_and_litert_refuse_a_mixture(tmp_path):
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    api.quantize_to(str(tmp_path / "src"), "w4-sym-g32", tmp_path / "q", progress=False)
    for fmt in ("onnx", "litert"):
        with pytest.raises(LowbitError, match=f"mixture of experts.*{fmt} graphs"):
            export(tmp_path / "q", fmt, tmp_path / f"x.{fmt}")
        assert not (tmp_path / f"x.{fmt}").exists()


def test_experts_of_other_layouts_are_refused(tmp_path):
    """GPT-OSS (biased, interleaved gate/up) and DBRX (stacked 2-D) stay errors, in memory and
    streamed, before any work."""
    import transformers as tf

    config = tf.GptOssConfig(**MOE_SMALL, intermediate_size=32, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    recipe = make_recipe({"bits": 4, "group_size": 32})
    with pytest.raises(LowbitError, match=r"gpt_oss: 8 expert weights .*mixture-of-experts"):
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
    dbrx = tf.DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=64,
                         ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
                         attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})  # fmt: skip
    with pytest.raises(LowbitError, match=r"dbrx: .*experts\.mlp\.w1"):
        experts_to_linears(tf.AutoModelForCausalLM.from_config(dbrx))


def test_other_3d_parameters_are_not_experts():
    """A ViT's class token and position table are 3-D; so are 1-D convolutions' weights."""
    import transformers as tf

    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    image_size=16, patch_size=8))  # fmt: skip
    assert any(p.dim() == 3 for p in vit.parameters())
    refuse_fused_experts(vit)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ConvTranspose1d(8, 4, 3), nn.Linear(4, 4))
    refuse_fused_experts(model)
    model.experts = nn.Module()
    model.experts.w = nn.Parameter(torch.zeros(2, 4, 4))
    with pytest.raises(LowbitError, match=r"experts\.w"):
        refuse_fused_experts(model)


def test_every_routed_token_is_counted():
    """A calibration pass that reaches only some experts runs to the block's end, so every
    expert's statistics hold all of its tokens (8 experts, one per token)."""
    from lowbit.calibration.capture import BlockCall
    from lowbit.calibration.runner import BlockContext

    model = tiny_moe("mixtral", num_local_experts=8, num_experts_per_tok=1)
    experts_to_linears(model)
    block = model.model.layers[0]
    hidden = torch.randn(6, 4, 64, generator=torch.Generator().manual_seed(0))
    position = torch.arange(4)[None].expand(6, -1)
    cos_sin = model.model.rotary_emb(hidden, position)
    calls = []
    for i in range(6):
        kwargs = {"position_embeddings": tuple(t[i : i + 1] for t in cos_sin),
                  "position_ids": position[i : i + 1]}  # fmt: skip
        calls.append(BlockCall(hidden[i : i + 1], (), kwargs))
    ctx = BlockContext(block, "model.layers.0", calls)
    names = [f"mlp.experts.{e}.gate_proj" for e in range(8)]
    stats = ctx.collect(names, hessian=True)
    assert sum(s.rows for s in stats.values()) == 24  # 6 calls x 4 tokens, one expert each


def test_a_checkpoint_with_fused_experts_is_refused_when_streamed(tmp_path):
    """GraniteMoE stores its experts fused on disk (``input_linear.weight``): in memory it
    quantizes (its routers float), streamed it is a clear error."""
    import transformers as tf

    config = tf.GraniteMoeConfig(**MOE_SMALL, intermediate_size=32, num_local_experts=4,
                                 num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    api.quantize(model, make_recipe({"bits": 4, "group_size": 32}), progress=False)
    routers = [m for n, m in model.named_modules() if n.endswith("router")]
    assert routers and not any(isinstance(m, QuantLinear) for r in routers for m in r.modules())
    with pytest.raises(LowbitError, match=r"does not hold each expert's matrices apart"):
        api.quantize_to(str(tmp_path / "src"), "w4-rtn-g32", tmp_path / "out", progress=False)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_compressed_tensors_of_a_mixture_load_in_transformers(tmp_path, kind):
    """Written under the family's stored expert names (Mixtral's w1/w3/w2), which transformers
    fuses on load; it decompresses the experts into float16, hence the tolerance."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    tiny_moe(kind).save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    api.quantize_to(str(tmp_path / "src"), "w4-sym-g32", tmp_path / "q", progress=False)
    out = export(tmp_path / "q", "compressed-tensors", tmp_path / "ct").path
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = api.load(tmp_path / "q", kernels=False).model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert float((theirs - ours).abs().max() / ours.abs().max()) < 1e-3


def test_smoothquant_reads_every_experts_first_inputs_in_one_pass():
    """SmoothQuant's search inputs of every expert's up_proj -> down_proj pair come from one
    pass over the first batch, not one pass per expert."""
    from lowbit.recipes import load_recipe

    model = tiny_moe("mixtral", num_local_experts=16, num_experts_per_tok=2)
    calls = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    api.quantize(model, load_recipe("w8a8-smoothquant"), calibration=windows(4),
                 progress=False)  # fmt: skip
    per_block = len(calls) / len(model.model.layers)
    assert per_block < 16  # the block's passes, whatever the number of experts

"""Test helpers: tiny random models of each architecture family and a real word tokenizer."""

from __future__ import annotations

import contextlib
import string

import torch

from lowbit.kernels.affine import AffineWeight, to_affine

TEXT = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "all that glitters is not gold . the early bird catches the worm . "
) * 40
# a small RGB input for the super-resolution models' tests (waifu2x's architectures)
SMALL_IMAGE = torch.rand(1, 3, 24, 28, generator=torch.Generator().manual_seed(0))


def make_tokenizer():
    """A word-level tokenizer over a small vocabulary (real `tokenizers` object)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split())) + list(string.ascii_lowercase)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_llama(vocab: int = 64, layers: int = 2, hidden: int = 64, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_family_model(family: str, vocab: int = 64, seed: int = 0):
    """A 2-block random causal LM of one architecture family (built offline from its config)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": vocab}
    llama_like = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 256}  # fmt: skip
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, **llama_like),
        "qwen2": lambda: tf.Qwen2Config(**common, **llama_like),
        "mistral": lambda: tf.MistralConfig(**common, **llama_like),
        "gemma": lambda: tf.GemmaConfig(**common, **llama_like, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**common, **llama_like, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, **llama_like, head_dim=16),
        "qwen3": lambda: tf.Qwen3Config(**common, **llama_like, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**common, **llama_like, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1),
        # outside the families lowbit names: Granite scales the stream, Arcee's MLP has no gate
        "granite": lambda: tf.GraniteConfig(**common, **llama_like, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, logits_scaling=3.0),
        "arcee": lambda: tf.ArceeConfig(**common, **llama_like),
        "cohere": lambda: tf.CohereConfig(**common, **llama_like, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=1),  # attention beside the MLP
        "olmo2": lambda: tf.Olmo2Config(**common, **llama_like, pad_token_id=0, eos_token_id=1),
        "glm4": lambda: tf.Glm4Config(**common, **llama_like, head_dim=16, pad_token_id=0,
                                      eos_token_id=1),
        "gpt2": lambda: tf.GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "opt": lambda: tf.OPTConfig(**common, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64,
                                    max_position_embeddings=256),
        "bloom": lambda: tf.BloomConfig(**common, hidden_size=64, n_layer=2, n_head=4),  # ALiBi
        # Falcon's linears are a subclass of nn.Linear (FalconLinear)
        "falcon": lambda: tf.FalconConfig(**common, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, bias=False),
        # Pythia's: its checkpoints store the head as embed_out, which transformers renames
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=256),
    }  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(configs[family]()).eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2", "opt"]
TRACED = [*FAMILIES, "qwen3", "gemma2", "gemma3", "phi3"]  # wiring derived by tracing


def make_recipe(weights: dict, activations: dict | None = None, ignore=("lm_head",)):
    """A recipe object from a weights (and activations) dict."""
    from lowbit.recipes import Recipe

    body = {"version": 1, "name": "test", "weights": weights, "ignore": list(ignore)}
    if activations is not None:
        body["activations"] = activations
    return Recipe.from_dict(body)


def quantized_folder(src_folder, out, recipe):
    """Quantize the model saved in ``src_folder`` and save it to ``out``: (folder, model)."""
    from lowbit import api

    src = api.load_model(str(src_folder))
    report = api.quantize(src.model, recipe, progress=False)
    return api.save(src.model, out, report, source=src), src.model


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style: llama.cpp's `gpt2` vocabulary) trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def rel(a, b) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def compact_and_hf(model, seed: int, batch: int = 2, prompt_len: int = 9, follow_len: int = 5,
                   vocab: int = 64):  # fmt: skip
    """Random prompt and follow-up tokens (ids below ``vocab``) decoded by the compact loop and
    by the model's own forward through the runtime: (ours, theirs, whole-window logits, our
    cache)."""
    from lowbit.runtime.hf_forward import HFForward
    from lowbit.runtime.llama import LlamaForward

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    follow = torch.randint(0, vocab, (batch, follow_len), generator=g)
    with torch.inference_mode():
        ours, cache = decode_steps(LlamaForward(model), prompt, follow)
        theirs, _ = decode_steps(HFForward(model), prompt, follow)
        whole = model(torch.cat([prompt, follow], 1)).logits
    return ours, theirs, whole, cache


def decode_steps(forward, prompt, follow, capacity: int = 32):
    """Logits of the prompt (every position), then of each token of ``follow`` fed one by one
    through a runtime forward; returns (logits (B, P + F, vocab), the cache)."""
    cache = forward.new_cache(prompt.shape[0], capacity)
    out = [forward(prompt, cache, all_logits=True)]
    for tok in follow.unbind(1):
        out.append(forward(tok.view(-1, 1), cache).unsqueeze(1))
    return torch.cat(out, dim=1), cache


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm2d running statistics and affine terms that are not the identity
    (seeded by the caller), so folding them is tested; returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def convnet():
    """A tiny 2x upscaler of the waifu2x kind: convs, a grouped conv, a transposed conv."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1, bias=False),
    ).eval()  # fmt: skip


MOE_SMALL = {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def tiny_moe(kind: str, **extra):
    """A random mixture-of-experts causal LM (fused experts, as transformers builds it)."""
    import transformers as tf

    configs = {
        "mixtral": lambda: tf.MixtralConfig(**MOE_SMALL, intermediate_size=64,
                                            num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**MOE_SMALL, intermediate_size=128, head_dim=16,
                                               moe_intermediate_size=32, num_experts=8,
                                               num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**MOE_SMALL, intermediate_size=128, num_experts=8,
                                               moe_intermediate_size=32, num_experts_per_tok=2,
                                               shared_expert_intermediate_size=64),
        "olmoe": lambda: tf.OlmoeConfig(**MOE_SMALL, intermediate_size=32, num_experts=8,
                                        num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**MOE_SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4},
            intermediate_size=128,
            moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    }  # fmt: skip
    config = configs[kind]()
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def gguf_reads_back_the_same(path, model):
    """transformers' GGUF loader reads ``path`` back to ``model``'s logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()  # fmt: skip
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    x = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(back(x).logits, model(x).logits, atol=1e-4, rtol=0)


def random_affine(
    n: int, k: int, group: int, bits: int, seed: int = 0, params: str = "f32"
) -> AffineWeight:
    """Random kernel weights: random codes and params, ``f32`` ones float16 cannot hold (the
    kernel keeps float32), ``f16`` ones it holds exactly (kept in float16), ``sym`` a
    symmetric grid (no offsets)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group if group != -1 else 1
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-3
    offset = torch.randn(n, groups, generator=g) * 0.05
    if params in ("f16", "sym"):
        scale, offset = scale.half().float(), offset.half().float()
    if params == "sym":
        offset = -(2 ** (bits - 1)) * scale
    block = (1, group if group != -1 else k)
    return to_affine(codes, scale, offset, block, bits)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` threads within the block, its former count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

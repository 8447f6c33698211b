"""The model's own forward as a runtime: a short prompt into an empty cache, on a model whose
layers all run on lowbit's pooled kernels, holds torch's ops to one thread; nothing else
does (decode steps attend over the whole cache in torch)."""

import pytest
import torch

from helpers import rel, tiny_family_model, torch_threads
from lowbit import api
from lowbit.kernels.build import native_ops
from lowbit.models import use_kernels
from lowbit.runtime.hf_forward import HFForward


def test_only_short_prompts_into_an_empty_cache_hold_torch_to_one_thread():
    if not native_ops() or torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("native kernels unavailable here, or OpenMP runs them")
    model = tiny_family_model("llama")
    api.quantize(model, "w4-sym-g32-head8", progress=False)
    use_kernels(model)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch_threads(2), torch.inference_mode():
        forward = HFForward(model)
        cache = forward.new_cache(1, 48)
        held = forward(ids[:, :32], cache, all_logits=True)  # held
        forward(ids[:, 32:33], cache)  # a decode step: not held
        forward(ids[:, 33:40], forward.new_cache(1, 48))  # short, empty cache: held
        forward(ids, forward.new_cache(1, 48))  # 40 tokens: not held
        plain = HFForward(model)
        plain._pooled = False
        free = plain(ids[:, :32], plain.new_cache(1, 48), all_logits=True)
    assert seen == [1, 2, 1, 2, 2]
    assert rel(held, free) < 1e-5


def test_a_longrope_model_reads_its_sequence_again_when_it_outgrows_the_original_context():
    """Phi-3's LongRoPE rotates every position with its long factors once the sequence passes
    original_max_position_embeddings; transformers' generate then reads the sequence again, and
    so does lowbit's loop: the same tokens and logits across the switch (at 64 here)."""
    import transformers

    from lowbit.runtime import Runtime

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.3 * i for i in range(8)],
            "original_max_position_embeddings": 64}  # fmt: skip
    config = transformers.Phi3Config(vocab_size=100, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=128,
                                     original_max_position_embeddings=64, pad_token_id=0,
                                     eos_token_id=None, rope_parameters=rope)  # fmt: skip
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    prompt, n = [71, 12, 40, 95, 33, 8, 54, 27], 80
    seen = []
    run = Runtime(model).generate([prompt], n, on_logits=lambda logits: seen.append(logits[0]))
    with torch.inference_mode():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip
    assert run.path == "hf" and run.tokens[0] == want.sequences[0, len(prompt) :].tolist()
    for got, ref in zip(seen, want.logits, strict=True):
        assert (got - ref[0]).abs().max() <= 1e-4 * ref[0].abs().max()


def test_a_model_that_returns_no_cache_is_a_clear_error():
    """RecurrentGemma keeps its own recurrent state and hands no cache back."""
    import transformers as tf

    from lowbit.errors import LowbitError

    config = tf.RecurrentGemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=3, num_attention_heads=4, lru_width=64,
                                     attention_window_size=32, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    forward = HFForward(model)
    with torch.inference_mode(), pytest.raises(LowbitError, match="recurrent_gemma returns no"):
        forward(torch.randint(0, 64, (1, 5)), forward.new_cache(1, 16))

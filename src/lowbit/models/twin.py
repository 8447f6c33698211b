"""A tiny random twin of a causal LM: the same transformers class and config at width 64, to
test a transformation on what the architecture computes before it touches the real weights
(which may be 70B parameters, or still on disk).

Only the widths change (and a mixture of experts' count, to 4 experts): every other setting
(multipliers, biases, norms' kind, rope kind, tied head) stays the config's, and so does the
depth, so that settings that differ from block to block (layers without RoPE every fourth
block, a sliding window on some) are all in the twin (80 blocks of width 64 are 3M
parameters). A setting tied to the widths (a per-dimension rope
table, say) may make the twin unbuildable or unrunnable: :func:`tiny_twin` then says so, and
the caller treats the architecture as untested.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.errors import LowbitError

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "head_dim": 16, "vocab_size": 128}  # fmt: skip
# mixture-of-experts settings (what each family calls them): 4 experts of width 32, 2 per
# token, one routing group, so that a 128-expert model's twin stays small
EXPERTS = {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
           "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
           "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}  # fmt: skip
KEEP_BELOW = {"num_experts_per_tok"}
# multi-head latent attention (DeepSeek V2/V3): its ranks and head parts, its head_dim the
# rotary part (as its config derives it)
LATENT = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
          "v_head_dim": 16}  # fmt: skip
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def tiny_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 model of ``model``'s class and config at :data:`SIZES`, with seeded random
    weights (norm scales near 1, biases nonzero: values that folding would not hide)."""
    try:  # any failure, from the config's edits on: the architecture stays untested
        small = _small_config(model.config)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # (the caller's state kept)
            twin = type(model)(small)
            _randomise(twin, seed)
    except Exception as exc:
        raise LowbitError(f"no small {type(model).__name__} can be built from its config "
                          f"({type(exc).__name__}: {exc})") from None  # fmt: skip
    return twin.double().eval()


def _small_config(config):
    small = copy.deepcopy(config)
    heads = config.num_attention_heads
    for key, value in (SIZES | EXPERTS | LATENT).items():
        if getattr(small, key, None) is not None:  # experts per token: at most 2 (top-1 stays)
            setattr(small, key, min(value, getattr(small, key)) if key in KEEP_BELOW else value)
    if getattr(small, "qk_nope_head_dim", None) is not None:  # latent attention
        small.head_dim = small.qk_rope_head_dim
        small.qk_head_dim = small.qk_rope_head_dim + small.qk_nope_head_dim
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None:  # keep the kind of attention: multi-head, grouped or one key/value head
        small.num_key_value_heads = SIZES["num_attention_heads"] if kv == heads else min(kv, 2)
    small._attn_implementation = "eager"  # float64 on any CPU, whatever the config asked for
    small._experts_implementation = "eager"  # (grouped_mm takes no float64)
    for key in TOKEN_IDS:  # ids past the small vocabulary (an embedding's padding row)
        value = getattr(small, key, None)
        if isinstance(value, int) and value >= SIZES["vocab_size"]:
            setattr(small, key, 0)
    return small


@torch.no_grad()
def _randomise(twin: nn.Module, seed: int) -> None:
    """Seeded weights: norm scales near 1 (and scalars: multipliers), biases small but
    nonzero, matrices of unit gain."""
    g = torch.Generator().manual_seed(seed)
    for name, p in twin.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 0 or (p.dim() == 1 and "norm" in name and name.endswith("weight")):
            p.copy_(1 + 0.3 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5)


def twin_ids(seed: int = 0) -> torch.Tensor:
    """Seeded random ids (2 x 12) within the twin's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SIZES["vocab_size"], (2, 12), generator=g)


def twin_logits(twin: nn.Module, seed: int = 0) -> torch.Tensor:
    """The twin's logits (2, 12, vocab) on :func:`twin_ids`; a failure is a LowbitError."""
    ids = twin_ids(seed)
    try:
        with torch.no_grad():
            return twin(ids).logits
    except Exception as exc:  # as in tiny_twin
        raise LowbitError(f"a small {type(twin).__name__} does not run ({type(exc).__name__}: "
                          f"{exc})") from None  # fmt: skip

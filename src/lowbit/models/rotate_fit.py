"""Which decoders a folded rotation fits (:mod:`lowbit.models.rotate`), decided from their
structure before any tensor is read: the families it names, the LayerNorm ones and what their
configs must not do, and the blocks that hold a Llama block's parts and nothing else (the
candidates a tiny twin then confirms, in :mod:`lowbit.models.rotate`)."""

from __future__ import annotations

from torch import nn

from lowbit.algorithms.rotate import RotateOptions
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks

# Decoders whose blocks normalise the stream only before attention and before the MLP, with an
# RMSNorm (no mean, no bias) whose scale folds into the linears that read it: x·w, or Gemma's
# x·(1 + w) (its Family's "norm_plus_one" feeders, lowbit.models.families). Phi-3's fused
# q/k/v and gate/up projections read the stream as the separate ones do. Gemma 2/3 (and
# OLMo 2) also normalise each sub-block's output before it is added to the stream: a norm's
# per-channel scale after the rotation does not commute with it, so no folded rotation keeps
# their function.
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# Any other decoder whose blocks hold a Llama block's parts and nothing else (below) is rotated
# by the same plan when a tiny random twin of it (lowbit.models.twin: its class and config,
# width 64) computes the same logits after the rotation, with its norms scaling by w or by
# 1 + w (whichever keeps them): Granite's multipliers, Arcee's MLP without a gate and the
# like pass; a block that computes something else there fails the twin, before any real weight
# changes. The twin's verdict is the rule, the parts' names only its precondition.
ATTENTION = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP = (("gate_proj", "up_proj"), ("gate_up_proj",), ("up_proj",))
PER_HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # Qwen3's: untouched
# LayerNorm decoders (pre-norm): the stream turns by a Q that keeps the mean direction
# (keep_mean), so a LayerNorm without scale and bias commutes with it; its scale folds into
# the readers' weights and its bias into their biases (b + W·β); the final norm keeps a bias
# (β/g)·Q for the head, which has none. The blocks' wiring (each norm and the linears that
# read it, then the sub-blocks' output linears) is their Family's in lowbit.models.families;
# here only the position embedding and the final norm, beside the blocks.
LAYERNORM = {"opt": ("embed_positions", "final_layer_norm"), "gpt2": ("wpe", "ln_f")}


def check_layernorm(config, options: RotateOptions) -> None:
    """What a LayerNorm decoder's rotation cannot do, before any work."""
    if options.kind == "learned" or options.online:
        raise LowbitError(f"rotate: {config.model_type} (LayerNorm) takes kind hadamard or "
                          f"random and no online rotation")  # fmt: skip
    if getattr(config, "add_cross_attention", False):
        raise LowbitError(f"rotate: this {config.model_type}'s cross-attention reads the stream "
                          f"too; quantize it without rotate")  # fmt: skip
    if getattr(config, "_remove_final_layer_norm", False):
        raise LowbitError(f"rotate: this {config.model_type} has no final norm to keep the "
                          f"head's share of the rotation; quantize it without rotate")  # fmt: skip
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise LowbitError(f"rotate: this {config.model_type}'s LayerNorms have no scale and bias "
                          f"to fold; quantize it without rotate")  # fmt: skip
    hidden = config.hidden_size
    if (
        not getattr(config, "do_layer_norm_before", True)
        or getattr(config, "word_embed_proj_dim", hidden) != hidden
    ):
        raise LowbitError(f"rotate: this {config.model_type} normalises after its sub-blocks "
                          f"or projects its embeddings; quantize it without rotate")  # fmt: skip


def why_not(model: nn.Module) -> str:
    """What in the model's blocks a folded rotation cannot keep (or "")."""
    try:
        block = find_blocks(model)[1][0]
    except (LowbitError, IndexError):
        return ""
    names = [n for n, m in block.named_children() if "norm" in type(m).__name__.lower()]
    if any(isinstance(m, nn.LayerNorm) for m in block.modules()):
        return " (its LayerNorms subtract the mean and add a bias)"
    if len(names) > 2:
        return f" (its blocks also normalise sub-block outputs: {', '.join(names)})"
    return ""


def llama_shape(model: nn.Module) -> str:
    """ "" when every block holds a Llama block's parts (two RMSNorm scales, q/k/v or a fused
    qkv, o_proj, an MLP of ``MLP``'s readers and down_proj, their biases, per-head q/k norms)
    and nothing else, and the model nothing beside them but the embedding, the final ``norm``
    and the head; else what is in the way, for the error."""
    why = why_not(model)
    if why:
        return why
    try:
        prefix, blocks = find_blocks(model)
    except LowbitError:
        return " (no repeated decoder blocks)"
    for block in blocks:
        have = {n for n, _ in block.named_parameters()}
        attn = next((g for g in ATTENTION if all(f"self_attn.{n}.weight" in have for n in g)), ())
        mlp = next((g for g in MLP if all(f"mlp.{n}.weight" in have for n in g)), ())
        needed = {"input_layernorm.weight", "post_attention_layernorm.weight",
                  "self_attn.o_proj.weight", "mlp.down_proj.weight"}  # fmt: skip
        if not attn or not mlp or not needed <= have:
            return " (its blocks lack a Llama block's norms and projections)"
        linears = [f"self_attn.{n}" for n in (*attn, "o_proj")]
        linears += [f"mlp.{n}" for n in (*mlp, "down_proj")]
        parts = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
        extra = sorted(have - parts - needed - set(PER_HEAD_NORMS))
        if extra:
            return f" (its blocks also hold {', '.join(extra[:3])})"
    ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    known = {name_of(model, m) for m in ends} | {f"{prefix.rpartition('.')[0]}.norm".lstrip(".")}
    outside = sorted(
        n
        for n, _ in model.named_parameters()
        if not n.startswith(f"{prefix}.") and n.rpartition(".")[0] not in known
    )
    return f" (it also holds {', '.join(outside[:3])} outside its blocks)" if outside else ""


def name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)

"""Which decoders a folded rotation fits (:mod:`lowbit.models.rotate`), decided from their
structure before any tensor is read: the families it names, the LayerNorm ones and what their
configs must not do, and the blocks that hold a Llama block's parts and nothing else (the
candidates a tiny twin then confirms, in :mod:`lowbit.models.rotate`)."""

from __future__ import annotations

import re

from torch import nn

from lowbit.algorithms.rotate import RotateOptions
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks

# Decoders whose blocks normalise the stream only before attention and before the MLP, with an
# RMSNorm (no mean, no bias) whose scale folds into the linears that read it: x·w, or Gemma's
# x·(1 + w) (its Family's "norm_plus_one" feeders, lowbit.models.families). Phi-3's fused
# q/k/v and gate/up projections read the stream as the separate ones do.
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# Gemma 2/3, GLM-4, OLMo 2/3 and EXAONE 4 also normalise each sub-block's output before
# adding it to the stream ("sandwich" norms; OLMo 2's and EXAONE 4's attention and MLP read the
# stream itself, with no norm before them). Such a norm's per-channel scale after the rotation
# does not commute with it, so no folded matrix keeps their function: the stream's matrix is
# applied to those norms' outputs at run time instead (lowbit.nn.online.OnlineStream, a fast
# Hadamard transform: kind hadamard only), and folded everywhere else (embedding, the linears
# that read the pre-norms, the head); o_proj and down_proj write to the stream unturned.
# Per layout, by name: (the norms before attention and the MLP, the norms after them); a
# block's layout is the first whose names it holds all of, and its norms must be those only.
LAYOUTS = (
    (("input_layernorm", "pre_feedforward_layernorm"),
     ("post_attention_layernorm", "post_feedforward_layernorm")),  # Gemma 2/3
    (("input_layernorm", "post_attention_layernorm"),
     ("post_self_attn_layernorm", "post_mlp_layernorm")),  # GLM-4
    ((), ("post_attention_layernorm", "post_feedforward_layernorm")),  # OLMo 2/3, EXAONE 4
    (("input_layernorm", "post_attention_layernorm"), ()),  # Llama: before them only
)  # fmt: skip
# Any other decoder whose blocks hold a Llama block's parts and nothing else (below) is rotated
# by the same plan when a tiny random twin of it (lowbit.models.twin: its class and config,
# width 64) computes the same logits after the rotation, with its norms scaling by w or by
# 1 + w (whichever keeps them): Granite's multipliers, Arcee's MLP without a gate and the
# like pass; a block that computes something else there fails the twin, before any real weight
# changes. The twin's verdict is the rule, the parts' names only its precondition.
# (the linears of attention that read the stream): q/k/v, Phi-3's fused qkv, or a latent
# attention's (DeepSeek V2/V3: the query through q_a_proj or q_proj, keys and values through
# kv_a_proj_with_mqa; the values come out of kv_b_proj, inside, per head after the keys' part)
ATTENTION = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("q_a_proj", "kv_a_proj_with_mqa"),
             ("q_proj", "kv_a_proj_with_mqa"))  # fmt: skip
LATENT_INSIDE = ("q_a_layernorm.weight", "q_b_proj.weight", "kv_a_layernorm.weight",
                 "kv_b_proj.weight")  # fmt: skip
MLP = (("gate_proj", "up_proj"), ("gate_up_proj",), ("up_proj",))
# A mixture of experts' MLP (after lowbit.models.experts): each expert's gate_proj and up_proj
# read the stream and its down_proj writes to it, as a dense MLP's do; the router (one score
# per expert) and a shared expert's gate (one output) read it too (they stay float: turned
# exactly); a shared expert is a dense MLP. A router's own vectors (Ernie 4.5's correction bias
# of the scores) do not read the stream. A mixture's other parts are not a Llama block's, and
# stop the rotation.
EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight")
MIXTURE_PARTS = ("mlp.gate.weight", "mlp.shared_expert_gate.weight",
                 *(f"mlp.{e}.{n}.weight" for e in ("shared_expert", "shared_experts")
                   for n in ("gate_proj", "up_proj", "down_proj")))  # fmt: skip
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
    pre, post = norm_layout(block)
    if len(names) > 2 and sorted(names) != sorted(pre + post):
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
        experts = {n for n in have if EXPERT.fullmatch(n)}
        pre, post = norm_layout(block)
        needed = {f"{n}.weight" for n in pre + post} | {"self_attn.o_proj.weight"}
        if not experts:
            needed.add("mlp.down_proj.weight")
        elif "mlp.gate.weight" not in have:
            return " (its mixture of experts has no router at mlp.gate)"
        if not attn or not (mlp or experts) or not needed <= have:
            return " (its blocks lack a Llama block's norms and projections)"
        linears = [f"self_attn.{n}" for n in (*attn, "o_proj")]
        linears += [f"mlp.{n}" for n in (*mlp, "down_proj")] if mlp else []
        parts = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
        if "kv_a_proj_with_mqa" in attn:
            parts |= {f"self_attn.{n}" for n in LATENT_INSIDE}
        if experts:
            parts |= experts | set(MIXTURE_PARTS)
            parts |= {n for n in have if n.startswith("mlp.gate.") and n.count(".") > 2}
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


def mlp_parts(mlp: nn.Module) -> tuple[list[str], list[tuple[str, int]]]:
    """The weights (names under ``mlp``) of a block's MLP that read the stream (a dense MLP's
    gate/up; a mixture's router, experts' gate/up, shared expert and its gate) and those that
    write to it (every ``down_proj``), the latter with their input widths (an online rotation's
    width: a mixture's experts and its shared expert may differ from the config's)."""
    reads, writes = [], []
    for name, p in mlp.named_parameters():
        if p.dim() != 2 or not name.endswith(".weight"):
            continue
        if name.removesuffix(".weight").rpartition(".")[2] == "down_proj":
            writes.append((name, p.shape[1]))
        else:
            reads.append(name)
    return reads, writes


def norm_layout(block: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of ``block``'s norms before its sub-blocks and after them (``LAYOUTS``); a
    block of none of them is taken as a Llama's (what is missing then stops the rotation)."""
    for pre, post in LAYOUTS:
        if all(isinstance(getattr(block, n, None), nn.Module) for n in pre + post):
            return pre, post
    return LAYOUTS[-1]

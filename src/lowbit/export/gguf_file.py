"""GGUF export (llama.cpp): architecture metadata, tokenizer, and tensors in llama.cpp's layout.

Uses the ``gguf`` package's writer, tensor-name map and vocabulary readers; lowbit supplies only
the exact block encodings (:mod:`lowbit.export.gguf_blocks`) and the HF -> llama.cpp conventions
that the package leaves to llama.cpp's converter script: the rotary row order of Llama's q/k
projections and the architecture keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.gguf_blocks import encode, exact_type, requantize
from lowbit.export.gguf_experts import (
    EXPERT,
    ROUTERS,
    check_mixture,
    experts_of,
    mixture_metadata,
    stacked,
)
from lowbit.export.gguf_vocab import bpe_pre, is_sentencepiece_bpe, write_sentencepiece_vocab
from lowbit.models.experts import LinearExperts
from lowbit.models.families import find_blocks
from lowbit.nn import QuantLinear
from lowbit.runtime.llama_twin import family_reason, parts_missing, post_norm

log = logging.getLogger(__name__)

# HF model_type -> (llama.cpp architecture, permute q/k rows for llama.cpp's rotary layout).
# A family not listed goes out as LLAMA when it computes Llama's arithmetic: its tiny twin
# gets the same logits from lowbit's compact Llama forward as from its own
# (lowbit.runtime.llama_twin), and it has no per-head q/k norms and no sliding window, which
# llama.cpp's LLAMA graph does not have (biases it has).
ARCHS = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),  # q/k norms: attn_q_norm, attn_k_norm
    "phi3": (gguf.MODEL_ARCH.PHI3, False),  # fused qkv_proj, gate_up_proj: attn_qkv, ffn_up
    # mixtures of experts (lowbit.export.gguf_experts): Mixtral is a Llama with experts
    "mixtral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2_moe": (gguf.MODEL_ARCH.QWEN2MOE, False),  # a shared expert and its gate
    "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, False),
    "olmoe": (gguf.MODEL_ARCH.OLMOE, False),  # q/k norms over all heads: attn_q_norm
}
REQUANTIZE = {n: gguf.GGMLQuantizationType[n.upper()] for n in ("q8_0", "q4_0", "q4_1", "f16")}


def write_gguf(
    model: nn.Module,
    folder: Path,
    path: Path,
    source_gguf: Path | None = None,
    float_type: str = "f16",
    requantize_to: str | None = None,
) -> dict[str, str]:
    """Write ``model`` (a lowbit model loaded without kernels) to the GGUF file ``path``.

    Returns {tensor name: GGUF type}. The tokenizer comes from ``source_gguf`` when the model was
    loaded from one (the publisher's exact llama.cpp vocabulary), else from ``folder``'s
    tokenizer.json (GPT-2-style BPE).
    """
    config = model.config
    arch, permute = _arch(model)
    tensors = list(_tensors(model, arch, permute, float_type, requantize_to))
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, config, folder, arch)
    _tokenizer(writer, folder, source_gguf, config.vocab_size)
    types = {}
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
        types[name] = qtype.name
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type([t for _, d, t in tensors if d.ndim >= 2]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _arch(model: nn.Module) -> tuple[gguf.MODEL_ARCH, bool]:
    """(llama.cpp architecture, permute q/k rows) for ``model``, or a one-line error."""
    kind, config = model.config.model_type, model.config
    missing = parts_missing(model) if kind not in ARCHS else ""
    if missing:  # (first: a model without Llama's parts has no Llama head size to speak of)
        raise _not_llama(kind, missing)
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":  # llama.cpp's graphs for these architectures: SiLU, 1/sqrt(head size)
        if kind not in ARCHS:  # (not a claim about llama.cpp's own graph for the family)
            raise _not_llama(kind, f"its MLP uses {act}, not SiLU")
        raise LowbitError(f"GGUF export: llama.cpp's {kind} graph gates the MLP with SiLU; this "
                          f"model uses {act}")  # fmt: skip
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scaling = getattr(getattr(find_blocks(model)[1][0], "self_attn", None), "scaling", None)
    if scaling is not None and abs(scaling * head_dim**0.5 - 1) > 1e-6:
        if kind not in ARCHS:
            raise _not_llama(kind, f"it scales attention by {scaling:g}, not 1/sqrt({head_dim})")
        raise LowbitError(f"GGUF export: llama.cpp scales attention by 1/sqrt({head_dim}); this "
                          f"model by {scaling:g}")  # fmt: skip
    if kind in ARCHS:
        arch, permute = ARCHS[kind]
        if experts_of(config) is not None:
            blocks = find_blocks(model)[1]
            mixtures = sum(any(isinstance(m, LinearExperts) for m in b.modules()) for b in blocks)
            check_mixture(config, arch, len(blocks), mixtures)
        return arch, permute
    why = family_reason(model)
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    if why is None and post_norm(model):
        why = "its blocks are post-norm (llama.cpp's LLAMA graph norms each block's inputs)"
    if why is None and names & {"q_norm", "k_norm"}:
        why = "its attention normalises queries and keys"
    if why is None and getattr(model.config, "sliding_window", None):
        why = f"it attends through a sliding window of {model.config.sliding_window} tokens"
    if why is not None:
        raise _not_llama(kind, why)
    return gguf.MODEL_ARCH.LLAMA, True


def _not_llama(kind: str, why: str) -> LowbitError:
    return LowbitError(f"GGUF export supports {sorted(ARCHS)} models and others with Llama's "
                       f"arithmetic; {kind!r} is not one: {why}")  # fmt: skip


def _file_type(types: list[gguf.GGMLQuantizationType]) -> int:
    """llama.cpp's ``general.file_type``: the most common 2-D tensor type."""
    names = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0",
             "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}  # fmt: skip
    common = max(set(types), key=types.count) if types else gguf.GGMLQuantizationType.F32
    return int(gguf.LlamaFileType[names[common.name]])


def _metadata(writer: gguf.GGUFWriter, config: Any, folder: Path, arch: gguf.MODEL_ARCH) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # Qwen3's, e.g.: llama.cpp reads it here
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if experts_of(config) is not None:
        mixture_metadata(writer, config)
    window = getattr(config, "sliding_window", None)
    if arch == gguf.MODEL_ARCH.PHI3 and window:  # on every layer, as llama.cpp's converter
        writer.add_sliding_window(window)
    active = window and getattr(config, "use_sliding_window", True)  # Qwen2's is off unless set
    if active and window < config.max_position_embeddings:  # Mistral 7B v0.1, Phi-3, ...
        log.warning("llama.cpp runs %s without its sliding window: past %d tokens of context "
                    "its outputs differ from the model's", config.model_type, window)  # fmt: skip
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise LowbitError(f"RoPE on part of each head ({partial}) is not exported to GGUF yet")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise LowbitError(f"rope scaling {rope['rope_type']!r} is not exported to GGUF yet")


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, source: Path | None, n_vocab: int) -> None:
    if source is not None:
        _copy_tokenizer(writer, source)
        return
    if is_sentencepiece_bpe(folder):
        write_sentencepiece_vocab(writer, folder, n_vocab)
        return
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise LowbitError(
            f"{folder}: GGUF export needs a BPE tokenizer.json (GPT-2-style, or SentencePiece's "
            f"with byte fallback) ({exc})"
        ) from None
    tokens, types = [], []
    special = gguf.vocab.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special_ids = set(special.special_token_ids.values())
    for i, (text, _score, ttype) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL if i in special_ids else ttype)
    if len(tokens) > n_vocab:
        raise LowbitError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model's "
                          f"embeddings {n_vocab} rows")  # fmt: skip
    for i in range(n_vocab - len(tokens)):  # embedding rows past the tokenizer (Qwen2's, e.g.):
        tokens.append(f"[PAD{i}]")  # llama.cpp counts the vocabulary by this list
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    pre = bpe_pre(folder)
    if pre is None:
        log.warning("%s: llama.cpp has no pre-tokenizer known to split text as this tokenizer "
                    "does; the GGUF names its 'default', which may tokenize some text "
                    "differently", folder)  # fmt: skip
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Copy every ``tokenizer.*`` key of the source GGUF verbatim."""
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _tensors(model: nn.Module, arch: gguf.MODEL_ARCH, permute: bool, float_type: str,
             requantize_to: str | None):  # fmt: skip
    """(GGUF name, data, type) for every tensor, in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    tied = getattr(config, "tie_word_embeddings", False)
    modules = dict(model.named_modules())
    done = set()
    experts: dict[str, dict[int, tuple]] = {}  # stacked name -> expert -> (data, type)
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in done or (tied and key == "lm_head.weight"):
            continue
        mod = modules.get(owner)
        expert = EXPERT.match(owner)
        if expert is not None:  # stacked with the block's other experts below
            done.add(owner)
            part = _quantized(owner, mod, requantize_to) if isinstance(mod, QuantLinear) else (
                _float(tensor.detach().float(), float_type))  # fmt: skip
            experts.setdefault(f"{expert[1]}.{expert[3]}", {})[int(expert[2])] = part
            continue
        gname = names.get_name(f"{owner}.weight" if isinstance(mod, QuantLinear) else key,
                               try_suffixes=(".weight", ".bias"))  # fmt: skip
        if gname is None:
            raise LowbitError(f"{key}: no llama.cpp tensor name for it")
        rows_perm = None
        if permute and owner.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            n = heads if owner.endswith("q_proj") else kv_heads
            rows_perm = _rotary_rows(mod.out_features if hasattr(mod, "out_features") else
                                     tensor.shape[0], n)  # fmt: skip
        if isinstance(mod, QuantLinear):
            done.add(owner)
            data, qtype = _quantized(owner, mod, requantize_to)
            if rows_perm is not None:
                data = data[rows_perm]
            yield gname, np.ascontiguousarray(data), qtype
            if mod.bias is not None:
                bias = mod.bias.detach().float()
                bias = bias if rows_perm is None else bias[rows_perm]
                bname = names.get_name(f"{owner}.bias", try_suffixes=(".bias",))
                yield bname, bias.numpy(), gguf.GGMLQuantizationType.F32
            continue
        t = tensor.detach().float()
        if rows_perm is not None:
            t = t[rows_perm]
        if gname.endswith("ffn_gate_inp_shexp.weight"):  # (1, hidden): a vector, as llama.cpp
            t = t.reshape(-1)  # writes it and other readers (transformers') expect it
        yield gname, *_float(t, "f32" if gname.endswith(ROUTERS) else float_type)
    for name, parts in experts.items():
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise LowbitError(f"{name}: no llama.cpp tensor name for it")
        yield gname, *stacked(name, parts)


def _float(t: torch.Tensor, float_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float tensor as written: vectors and ``f32`` in float32, else float16."""
    if t.dim() == 1 or float_type == "f32":
        return t.numpy(), gguf.GGMLQuantizationType.F32
    return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16


def _quantized(layer: str, mod: QuantLinear, requantize_to: str | None):
    """A layer's GGUF data: exact where a GGUF type holds it; else, with ``requantize_to``,
    re-quantized (only such layers: "layers the format cannot hold exactly")."""
    if mod.act is not None:  # llama.cpp computes on its own activations
        raise LowbitError(f"{layer}: {mod.act.bits}-bit activations have no GGUF form (llama.cpp "
                          f"rounds activations its own way); export a weight-only recipe, or "
                          f"to onnx, which keeps them")  # fmt: skip
    try:
        qtype = exact_type(mod, layer)
        return encode(mod, qtype), qtype
    except LowbitError:
        if requantize_to is None:
            raise
    qtype = REQUANTIZE[requantize_to]
    w = mod.dequantized_weight()
    log.warning("%s: %s re-quantized to %s (lossy: scales and codes are recomputed from the "
                "dequantized weight)", layer, mod.spec.short(), qtype.name)  # fmt: skip
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.to(torch.float16).numpy(), qtype
    return requantize(w, qtype), qtype


def _rotary_rows(out_features: int, n_heads: int) -> torch.Tensor:
    """Row order llama.cpp expects for a Llama q/k projection: HF stores each head's rotary
    pairs as two halves, llama.cpp interleaves them (its converter's ``permute``)."""
    head = out_features // n_heads
    idx = torch.arange(out_features).reshape(n_heads, 2, head // 2)
    return idx.transpose(1, 2).reshape(-1)

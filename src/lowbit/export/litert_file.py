"""LiteRT (TensorFlow Lite) export: one ``.tflite`` with lowbit's exact codes.

Steps: each QuantLinear is encoded for LiteRT (:mod:`lowbit.export.litert_codes`) and swapped
for a float ``nn.Linear`` holding exactly the values its codes mean; litert-torch converts the
signatures of :mod:`lowbit.export.litert_graph`; each FULLY_CONNECTED weight is then replaced by
its codes and scales. The tokenizer files and a ``lowbit`` JSON record (config, signatures,
window and cache lengths, each layer's encoding) go into the file's metadata, so a ``.tflite``
alone can be scored (``lowbit eval model.tflite``), timed and run (``lowbit generate``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.assets import hidden_stem
from lowbit.errors import LowbitError
from lowbit.export.litert_codes import (
    REQUANTIZE,
    dequantize,
    digest,
    encode,
    exact_reason,
    requantized,
    write_codes,
)
from lowbit.export.litert_flat import add_metadata
from lowbit.export.litert_graph import CachedStep, Forward, cache_reason
from lowbit.models import set_module
from lowbit.nn import QuantLinear

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 1e-3  # of the logits' range: float32 against float32, same weights
CHECK_MAX_BYTES = 8e9  # float graphs past this (models past ~2B parameters) are not re-run

INFO_KEY = b"lowbit"
TOKENIZER_KEY = b"lowbit_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")  # fmt: skip


def write_litert(
    model: nn.Module,
    folder: Path,
    out: Path,
    seqlen: int | None,
    kv_cache: bool,
    prefill: int,
    cache: int | None,
    requantize: str | None,
) -> dict[str, str]:
    """Convert ``model`` (a lowbit folder loaded without kernels) into the file ``out``;
    returns each quantized layer's LiteRT encoding."""
    try:
        import litert_torch
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise LowbitError(
            "LiteRT export needs litert-torch and ai-edge-litert: pip install 'lowbit[litert]'"
        ) from None
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    seqlen = min(2048, context) if seqlen is None else seqlen
    cache = min(1024, context) if cache is None else cache
    _check_lengths(model, context, seqlen, kv_cache, prefill, cache)
    encoded = _swap_layers(model, requantize)
    converter = litert_torch.Converter()
    signatures = {}
    if kv_cache:  # decode first: the interpreter's primary subgraph, whose buffers the
        step = CachedStep(model, cache).eval()  # runtime reads and writes in place
        converter.signature("decode", step, sample_kwargs=step.sample(1))
        converter.signature("prefill", step, sample_kwargs=step.sample(prefill))
        signatures |= {"decode": {"cache": cache}, "prefill": {"tokens": prefill, "cache": cache}}
    ids = torch.zeros(1, seqlen, dtype=torch.int32)
    converter.signature("forward", Forward(model).eval(), sample_kwargs={"input_ids": ids})
    signatures["forward"] = {"seqlen": seqlen}
    log.info("converting %s with litert-torch (minutes for a large model)", ", ".join(signatures))
    quiet_litert_torch()
    # the float flatbuffer is written beside the output (same disk), removed on any exit
    work_dir = tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{hidden_stem(out)}.",
                                           suffix=".tmp")  # fmt: skip
    with work_dir as work, torch.no_grad():
        raw = Path(work) / "float.tflite"
        converter.convert().export(str(raw))
        _check_forward(raw, Forward(model).eval(), seqlen, model.config)
        flat = flatbuffer_utils.read_model(str(raw))
    biases = {name: m.bias.detach().float().numpy() for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.bias is not None}  # fmt: skip
    written = write_codes(flat, {k: v for k, v in encoded.items() if v[1] is not None},
                          biases=biases)  # fmt: skip
    info = {
        "producer": "lowbit", "config": model.config.to_dict(), "signatures": signatures,
        "layers": written, "requantize": requantize,
    }  # fmt: skip
    add_metadata(flat, INFO_KEY, json.dumps(info).encode())
    add_metadata(flat, TOKENIZER_KEY, json.dumps(_tokenizer_files(folder)).encode())
    flatbuffer_utils.write_model(flat, str(out))
    return written


def _check_lengths(model: nn.Module, limit: int, seqlen: int, kv: bool, prefill: int,
                   cache: int) -> None:  # fmt: skip
    if seqlen < 2 or seqlen > limit:
        raise LowbitError(f"--seqlen {seqlen} must be between 2 and the model's context {limit}")
    if not kv:
        return
    if not 1 < prefill <= cache <= limit:
        raise LowbitError(f"need 1 < --prefill ({prefill}) <= --cache ({cache}) <= the "
                          f"model's context ({limit})")  # fmt: skip
    reason = cache_reason(model, cache)
    if reason is not None:
        raise LowbitError(f"no KV-cache export for this model: {reason}; export without "
                          "--kv-cache for scoring only")  # fmt: skip


def _swap_layers(model: nn.Module, requantize: str | None) -> dict:
    """Every QuantLinear becomes an nn.Linear holding what its LiteRT encoding means; returns
    digest of that float weight -> (layer, encoding or None for a layer kept in float)."""
    if requantize is not None and requantize not in REQUANTIZE:
        raise LowbitError(f"--requantize for LiteRT takes one of {', '.join(REQUANTIZE)}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise LowbitError("the model has no quantized layers to export")
    encoded = {}
    for name, mod in layers:
        act = mod.act
        if act is not None and not (act.dynamic and act.granularity == "token" and act.bits == 8):
            raise LowbitError(f"{name}: {act.short()} inputs have no LiteRT form (its dynamic "
                              "FULLY_CONNECTED rounds each input row to 8 bits as it arrives, "
                              "what `activations: {bits: 8, granularity: token, dynamic: true, "
                              "symmetric: false}` computes)")  # fmt: skip
        reason = exact_reason(mod)
        if reason is None:
            enc = encode(mod, name)
            weight = dequantize(enc)
        elif requantize is None:
            enc = encode(mod, name)  # raises, naming the layer and the reason
        else:
            original = mod.dequantized_weight()
            enc = requantized(mod, original, requantize)
            weight = original if enc is None else dequantize(enc)
            err = ((weight - original).norm() / original.norm().clamp_min(1e-12)).item()
            log.warning("%s: %s -> %s (requantized, relative weight error %.2e)", name,
                        reason, enc.kind if enc else "float32", err)  # fmt: skip
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        linear.weight.data = weight.contiguous()
        if mod.bias is not None:
            linear.bias.data = mod.bias.detach().float()
        set_module(model, name, linear)
        encoded[digest(linear.weight)] = (name, enc)
    return encoded


def _check_forward(raw: Path, forward: nn.Module, seqlen: int, config) -> None:
    """The converted float graph's logits against the model's own on one random window: the
    converter has computed some architectures differently (Falcon's and GPTBigCode's single
    key/value head: every position after the first wrong), and such a file must not be
    written. Both are float32 with the same weights, so they agree to ~1e-5."""
    from ai_edge_litert.interpreter import Interpreter

    if raw.stat().st_size > CHECK_MAX_BYTES:  # the interpreter would hold another copy
        log.warning("the converted graph is not checked against the model: its float32 file "
                    "is %.1f GB (checked up to %.0f GB)", raw.stat().st_size / 1e9,
                    CHECK_MAX_BYTES / 1e9)  # fmt: skip
        return
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seqlen), generator=gen, dtype=torch.int32)
    runner = Interpreter(model_path=str(raw)).get_signature_runner("forward")
    got = torch.from_numpy(runner(input_ids=ids.numpy())["logits"]).float()
    want = forward(ids)["logits"].float()  # (under write_litert's no_grad)
    scale = want.abs().max().clamp_min(1e-12)
    change = ((got - want).abs().amax(-1) / scale)[0]  # per position
    log.debug("the converted graph's logits against the model's: %.1e", float(change.max()))
    if float(change.max()) > CHECK_TOLERANCE:
        worst = int(change.argmax())
        raise LowbitError(f"LiteRT's converter computes this {config.model_type} model "
                          f"differently from transformers (logits off by {float(change.max()):.1e} "
                          f"of their range at position {worst} of a random window): no file "
                          "written; export it to ONNX instead")  # fmt: skip


def quiet_litert_torch() -> None:
    """litert-torch prints each conversion stage to stdout; lowbit logs its own steps."""
    from litert_torch import progress

    progress.console.quiet = True


def _tokenizer_files(folder: Path) -> dict[str, str]:
    return {
        n: (folder / n).read_text(encoding="utf-8")
        for n in TOKENIZER_FILES
        if (folder / n).is_file()
    }

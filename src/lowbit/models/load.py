"""Load a model from whatever the user names: zoo name, folder, GGUF file, lowbit folder, hub id."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from lowbit.assets import write_text_atomic
from lowbit.errors import LowbitError, reason
from lowbit.models.checkpoint import MANIFEST, load_folder, read_manifest
from lowbit.models.convert import converted_folder
from lowbit.models.images import image_models
from lowbit.models.kernels import use_kernels
from lowbit.models.normalize import fold_batchnorm
from lowbit.models.source import CONFIG_ERRORS, TensorSource, quantization_config, skeleton
from lowbit.models.zoo import build_random, random_folder, random_models, zoo, zoo_gguf
from lowbit.nn.attention import attention_spec, install_attention

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from.

    ``kind`` is one of ``zoo``, ``random`` (zoo shape, random weights), ``folder`` (HF folder),
    ``gguf``, ``lowbit``, ``hub``, ``litert`` (a ``.tflite`` run in LiteRT); ``folder``
    is the local HF-style folder the model was read from (the hub snapshot for hub models;
    None for random models, built in memory).
    """

    model: nn.Module
    tokenizer: Any
    source: str
    kind: str
    folder: Path | None = None
    manifest: dict | None = None


def load_model(source: str, kernels: bool = True) -> LoadedModel:
    """Load ``source`` in float32 (quantized layers stay packed for lowbit folders; with
    ``kernels``, those a fast kernel covers are converted to its layout, for inference only)."""
    randoms = random_models()
    if source in randoms:
        log.info("building %s (random weights: speed and memory only)", source)
        return LoadedModel(build_random(randoms[source]), None, source, "random")
    images = image_models()
    if source in images:
        return LoadedModel(images[source].load(), None, source, "image")
    path = Path(source).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        image = _image_skeleton(path)

        def prepare(model: nn.Module, manifest: dict) -> None:
            spec = attention_spec(manifest)
            if spec is not None:  # the key/value cache the recipe asked for
                install_attention(model, spec)
            if kernels:
                log.info("kernels for %s: %s", path, use_kernels(model))

        model, manifest = load_folder(path, image, prepare)
        tokenizer = None if image is not None else source_tokenizer(path)
        return LoadedModel(model, tokenizer, source, "lowbit", path, manifest)
    if path.suffix == ".tflite":
        if not path.is_file():
            raise LowbitError(f"no such file: {path}")
        from lowbit.models.litert import LiteRTModel
        from lowbit.models.litert_image import LiteRTImageModel, image_info

        info = image_info(path)
        if info is not None:  # an image model's file: model(x) as its folder's
            return LoadedModel(LiteRTImageModel(path, info), None, source, "litert", None)
        model = LiteRTModel(path)
        return LoadedModel(model, model.tokenizer(), source, "litert", None)
    if path.suffix == ".gguf" and not path.exists():
        raise LowbitError(f"no such file: {path}")
    folder, kind = source_folder(source)
    model, tok = _from_hf_folder(folder)
    return LoadedModel(model, tok, source, kind, folder)


def _image_skeleton(folder: Path) -> nn.Module | None:
    """The architecture of a quantized image model's folder (None: an HF model's folder)."""
    source = read_manifest(folder).get("source") or {}
    if source.get("kind") != "image":
        return None
    images = image_models()
    if source.get("model") not in images:
        raise LowbitError(f"{folder}: {MANIFEST} names image model {source.get('model')!r}, "
                          f"which this lowbit does not know ({', '.join(images)})")  # fmt: skip
    skeleton = images[source["model"]].build().eval()
    fold_batchnorm(skeleton)  # as quantization left it
    return skeleton


def source_folder(source: str) -> tuple[Path, str]:
    """(HF folder with safetensors weights, kind) for a float model named as ``load_model``
    takes it, without loading it: the folder a streamed run reads block by block."""
    entries = zoo()
    if source in entries:
        entry = entries[source]
        return converted_folder(zoo_gguf(entry), entry.member_sha256), "zoo"
    randoms = random_models()
    if source in randoms:
        return _with_tokenizer(random_folder(randoms[source]), randoms[source].tokenizer), "random"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            raise LowbitError(f"{source} is already quantized; start from the float model")
        if not (path / "config.json").is_file():
            raise LowbitError(f"{path} has neither config.json nor {MANIFEST}: not a model folder")
        return path, "folder"
    if path.is_file() and path.suffix == ".gguf":
        return converted_folder(path), "gguf"
    if path.exists():
        raise LowbitError(f"{path} is a file but not a .gguf model")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise LowbitError(f"no such file or folder: {source}")
    return _hub_folder(source), "hub"


def _with_tokenizer(folder: Path, zoo_name: str | None) -> Path:
    """A random model's folder with the tokenizer files of zoo model ``zoo_name`` beside its
    weights (so that it can be calibrated on real text; its token ids fit the vocabulary)."""
    if zoo_name is None or (folder / "tokenizer.json").is_file():
        return folder
    donor, _ = source_folder(zoo_name)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (donor / name).is_file():
            write_text_atomic(folder / name, (donor / name).read_text(encoding="utf-8"))
    return folder


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub model's config, safetensors shards and tokenizer (fetched
    when the hub is reachable, else from the local HF cache)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    local_only = not _hub_reachable()
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only)
    except Exception as exc:  # huggingface_hub raises many types; one line for the user
        why = "the hub is unreachable and it is not in the local HF cache"
        raise LowbitError(
            f"cannot load model {repo_id!r}: it is not a zoo name (see `lowbit models`), "
            f"not a local path, and from the Hugging Face hub: {why if local_only else reason(exc)}"
        ) from None
    return Path(path)


def _from_hf_folder(folder: Path) -> tuple[nn.Module, Any]:
    """The float model of an HF folder, its checkpoint checked first as a streamed run checks it
    (safetensors only: never a pickle; no tensor missing, truncated or of another shape), so a
    broken folder is one line, not a traceback or a model with random weights."""
    from transformers import AutoModelForCausalLM

    model = skeleton(folder)  # config.json readable and buildable
    if not quantization_config(folder):  # (transformers reads quantized checkpoints itself)
        TensorSource(folder).check(model)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     trust_remote_code=False,
                                                     use_safetensors=True)  # fmt: skip
    except CONFIG_ERRORS as exc:
        raise LowbitError(f"cannot load the model in {folder}: {reason(exc)}") from None
    _untied_as_loaded(model)
    return model.eval(), source_tokenizer(folder)


def _untied_as_loaded(model: nn.Module) -> None:
    """A config that ties the head to the embedding while the checkpoint holds another head:
    transformers keeps that head (untied), so the config must say so too, or a saved folder
    would be tied again when loaded (:func:`lowbit.models.source.TensorSource.check` does the
    same for streamed runs)."""
    config, head = model.config, model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None and (
            head.weight is not model.get_input_embeddings().weight):  # fmt: skip
        config.tie_word_embeddings = False


# files whose presence says the folder has a tokenizer (one that then fails to load is an error)
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def source_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        present = [f for f in _TOKENIZER_MARKERS if (Path(folder) / f).is_file()]
        if present:  # a tokenizer that cannot be read is not a model without one
            raise LowbitError(f"cannot read the tokenizer in {folder} ({', '.join(present)}): "
                              f"{reason(exc)}") from None  # fmt: skip
        log.warning("no tokenizer in %s; text evaluation will not be possible", folder)
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect (so offline use fails fast, not after
    a minute of retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False

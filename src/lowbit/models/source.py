"""Float checkpoints read lazily: a meta-device skeleton from ``config.json`` and tensors read
from the safetensors shards (memory-mapped, in their stored dtype) only when a block needs them.

An HF folder holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Every header is read and checked up front (missing shard, truncated file, a tensor whose shape
disagrees with ``config.json``), so a bad checkpoint fails in a second, not an hour into a run.
A checkpoint published in block-scaled FP8 (``quant_method: fp8`` with ``weight_block_size``,
as DeepSeek-V3 and Qwen3's FP8 releases are) is read as float: each weight times its
``weight_scale_inv`` per block, as transformers dequantizes it; one already quantized any
other way is refused (lowbit starts from the float weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from torch import nn

from lowbit.errors import LowbitError, reason
from lowbit.models.experts import checkpoint_renames, experts_to_linears
from lowbit.models.tensorfile import Entry, read_header

log = logging.getLogger(__name__)
# what transformers raises for a config.json it cannot read or build (a field of the wrong type,
# sizes that do not fit: huggingface_hub's strict dataclasses)
CONFIG_ERRORS = (OSError, ValueError, TypeError, StrictDataclassError)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorSource:
    """The tensors of an HF checkpoint folder, by name, read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, Entry] = {}
        for path in self._shards():
            entries, _ = read_header(path)
            self.entries.update(entries)
        self._check_index()
        self.scales = _block_scales(self.folder, self.entries)

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map = _weight_map(index)
            files = sorted(set(self.weight_map.values()))
            for name in files:
                if not (self.folder / name).is_file():
                    raise LowbitError(f"{index} lists shard {name}, which is missing")
            return [self.folder / n for n in files]
        self.weight_map = {}
        if (self.folder / SINGLE).is_file():
            return [self.folder / SINGLE]
        found = sorted(self.folder.glob("*.safetensors"))
        if not found:
            raise LowbitError(f"{self.folder} has no safetensors weights (lowbit does not read "
                              f"pickled .bin/.pt checkpoints)")  # fmt: skip
        return found

    def _check_index(self) -> None:
        for name, shard in self.weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.path.name != shard:
                raise LowbitError(f"{self.folder / INDEX} puts tensor {name!r} in {shard}, "
                                  f"which does not hold it")  # fmt: skip

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def load(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor ``name``; floating tensors converted to ``dtype`` (None: as stored)."""
        t = _read(self.entries[name], name)
        if name in self.scales:  # block-scaled FP8: the float weight it stands for
            scale, block = self.scales[name]
            t = _dequantize(t, _read(scale, f"{name}_scale_inv").float(), block)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def item(self, name: str) -> Entry | torch.Tensor:
        """What a writer copies for ``name``: its bytes on disk (an Entry), as stored (a
        block-scaled FP8 weight: dequantized, float32)."""
        return self.load(name) if name in self.scales else self.entries[name]

    def check(self, model: nn.Module) -> None:
        """Every tensor the skeleton expects is present with its shape (tied ones may be
        absent), so that a checkpoint that disagrees with ``config.json`` fails before work.
        Names saved without the model's prefix are read under the model's names from then on."""
        self._adopt_prefix(model)
        self._adopt_renamed(model)
        self._settle_tied(model)
        tied = tied_names(model)
        for name, t in _tensors(model).items():
            entry = self.entries.get(name)
            if entry is None:
                if name in tied:
                    continue
                if ".experts." in name:  # lowbit.models.experts: one expert's linear
                    raise LowbitError(f"{self.folder}: the checkpoint does not hold each "
                                      f"expert's matrices apart ({name!r} is missing; Mixtral's "
                                      f"and Qwen-MoE's do); lowbit streams only those: quantize "
                                      f"this model in memory (lowbit.quantize)")  # fmt: skip
                raise LowbitError(f"{self.folder}: tensor {name!r} that config.json implies is "
                                  f"missing from the checkpoint")  # fmt: skip
            if tuple(t.shape) != entry.shape:
                raise LowbitError(
                    f"{entry.path.name}: tensor {name!r} has shape {list(entry.shape)}, "
                    f"config.json implies {list(t.shape)}"
                )
            if t.is_floating_point() and not entry.dtype.startswith(("F", "BF")):
                raise LowbitError(f"{entry.path.name}: tensor {name!r} is stored as "
                                  f"{entry.dtype}; the model holds it as a float (F32, F16, BF16 "
                                  f"or F8)")  # fmt: skip
        known = set(_tensors(model)) | set(self.scales)
        extra = [n for n in self.entries if n not in known and not n.endswith(".inv_freq")]
        if extra:  # e.g. num_hidden_layers lowered by hand: the rest would silently go missing
            log.warning("%s: %d tensor(s) of the checkpoint are not in the model config.json "
                        "describes (%s, ...); they are left out", self.folder, len(extra),
                        extra[0])  # fmt: skip

    def _adopt_prefix(self, model: nn.Module) -> None:
        """GPT-2's and OPT's own checkpoints were saved from the base model, so their names
        lack the causal LM's prefix (``transformer.h.0...`` stored as ``h.0...``), which
        transformers adds when it loads them; so does this: such entries are keyed by the
        model's names (each Entry keeps its stored name for reading)."""
        head = f"{getattr(model, 'base_model_prefix', '')}."
        if head == "." or any(n.startswith(head) for n in self.entries):
            return
        for name in _tensors(model):
            bare = name[len(head) :]
            if name.startswith(head) and bare in self.entries:
                self.entries[name] = self.entries.pop(bare)
                if bare in self.weight_map:
                    self.weight_map[name] = self.weight_map.pop(bare)

    def _adopt_renamed(self, model: nn.Module) -> None:
        """Checkpoints of some families store tensors under older names that transformers
        renames when it loads them (Mixtral's ``block_sparse_moe.experts.3.w1.weight`` is
        lowbit's ``mlp.experts.3.gate_proj.weight``): such entries are keyed by the model's
        names too (:func:`lowbit.models.experts.checkpoint_renames`)."""
        wanted = _tensors(model)
        if all(n in self.entries for n in wanted):
            return
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        rename = checkpoint_renames(type(model).__name__, model_type)
        for stored in list(self.entries):
            name = rename(stored)
            if name != stored and name in wanted and name not in self.entries:
                self.entries[name] = self.entries.pop(stored)
                if stored in self.weight_map:
                    self.weight_map[name] = self.weight_map.pop(stored)

    def _settle_tied(self, model: nn.Module) -> None:
        """A tied pair (config.json's ``tie_word_embeddings``) as checkpoints store it: the
        embedding alone (the usual form); the head alone (read as the embedding: transformers
        ties it the other way); both, equal (Qwen3-0.6B's files: the head's copy dropped, so
        the table is written once, as the in-memory path writes it); or both, different (a
        fine-tuned head, which transformers keeps as its own: so does this, the skeleton's head
        untied, and config.json written untied)."""
        tied = [n for n in tied_names(model) if n in self.entries]
        if not tied:
            return
        embedding = model.get_input_embeddings()
        embed = next(f"{n}.weight" for n, m in model.named_modules() if m is embedding)
        head = tied[0]
        if embed not in self.entries:
            self.entries[embed] = self.entries.pop(head)
            if head in self.weight_map:
                self.weight_map[embed] = self.weight_map.pop(head)
        elif _same_values(self.entries[head], self.entries[embed], head, embed):
            del self.entries[head]
            self.weight_map.pop(head, None)
        else:
            log.info("%s: config.json ties %s to %s, but the checkpoint holds another %s; it is "
                     "kept as its own (as transformers keeps it)", self.folder, head, embed,
                     head)  # fmt: skip
            untie_head(model)


def _same_values(a: Entry, b: Entry, a_name: str, b_name: str) -> bool:
    """Whether two stored tensors hold the same values: their bytes compared in 64 MiB
    pieces where both are stored alike (no whole table in memory), else their values."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return torch.equal(_read(a, a_name).float(), _read(b, b_name).float())
    piece = 64 << 20
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        for offset in range(0, a.nbytes, piece):
            fa.seek(a.start + offset)
            fb.seek(b.start + offset)
            size = min(piece, a.nbytes - offset)
            if fa.read(size) != fb.read(size):
                return False
    return True


def untie_head(model: nn.Module) -> None:
    """Give a tied output head its own weight tensor, left for the caller to fill (a rotated
    head: in memory, or read through :class:`lowbit.models.rotate_source.RotatedSource`; a
    checkpoint's own head; meta stays meta), and mark the model untied."""
    if not tied_names(model):
        return
    model.config.tie_word_embeddings = False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head.weight = nn.Parameter(torch.empty_like(embed.weight), requires_grad=False)


def _read(entry: Entry, name: str) -> torch.Tensor:
    try:
        with safe_open(str(entry.path), framework="pt") as f:
            return f.get_tensor(entry.name)  # (the stored name: see _adopt_prefix)
    except Exception as exc:  # the reader's own error types; one line naming the file
        raise LowbitError(f"cannot read tensor {name!r} from {entry.path}: {exc}") from None


def config_json(folder: Path) -> dict:
    """``folder``'s config.json as a mapping ({} where it cannot be read: skeleton() names what
    is wrong with it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def quantization_config(folder: Path) -> dict:
    """config.json's ``quantization_config`` ({} for a float checkpoint)."""
    qconfig = config_json(folder).get("quantization_config")
    return qconfig if isinstance(qconfig, dict) else {}


def _block_scales(folder: Path, entries: dict[str, Entry]) -> dict[str, tuple[Entry, list[int]]]:
    """For a block-scaled FP8 checkpoint, each weight's scale tensor and block shape (the
    scales leave ``entries``: they are read with their weights); else nothing. A checkpoint
    quantized another way is a LowbitError."""
    qconfig = quantization_config(folder)
    method = qconfig.get("quant_method")
    if method is None or method == "lowbit":
        return {}
    block = qconfig.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise LowbitError(f"{folder} holds a model already quantized (quant_method {method!r}); "
                          f"lowbit quantizes float checkpoints (float32, bfloat16, float16 or "
                          f"block-scaled FP8): give it the original model")  # fmt: skip
    scales = {}
    for name in [n for n in entries if n.endswith("_scale_inv")]:
        weight = name.removesuffix("_scale_inv")
        if weight in entries:
            scales[weight] = (entries.pop(name), [int(b) for b in block])
    return scales


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    """An FP8 weight (out, in) times its per-block ``scale`` (ceil(out / b0), ceil(in / b1))."""
    rows, cols = q.shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.to(torch.float32) * full[:rows, :cols]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"{index} is not a valid shard index: {exc}") from None
    if not isinstance(weight_map, dict):
        raise LowbitError(f"{index}: weight_map is not an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (tied aliases listed under every name)."""
    return dict(model.state_dict(keep_vars=True))


def tied_names(model: nn.Module) -> set[str]:
    """Names of the output-embedding weight when it is tied to the input embedding."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}


def skeleton(folder: Path) -> nn.Module:
    """The model of ``folder``'s config.json on the meta device (no weight allocated; buffers
    such as rotary frequencies are real), with remote code never run; fused experts become
    linears (:func:`lowbit.models.experts.experts_to_linears`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_model_type(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except CONFIG_ERRORS as exc:
        raise LowbitError(f"cannot read the model config in {folder}: {reason(exc)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except CONFIG_ERRORS as exc:
        raise LowbitError(f"{folder}: transformers cannot build this model: "
                          f"{reason(exc)}") from None  # fmt: skip
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    experts_to_linears(model)  # a mixture of experts as per-expert linears, as lowbit holds it
    return model.eval()


def _check_model_type(folder: Path) -> None:
    """An architecture this transformers does not know, named in one line (transformers' own
    message runs long and is cut)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind = config_json(folder).get("model_type")  # (none: AutoConfig says what is wrong)
    if isinstance(kind, str) and kind not in CONFIG_MAPPING:
        raise LowbitError(f"{folder}: model_type {kind!r} is not an architecture transformers "
                          f"{transformers.__version__} knows (a newer release may; lowbit never "
                          f"runs a model's own code)")  # fmt: skip


def materialize(model: nn.Module, names: list[str], source: TensorSource) -> int:
    """Read the named tensors into ``model`` as float32 (integers as stored); tied output
    embeddings follow the input embedding. Returns the bytes read."""
    total = 0
    for name in names:
        if name not in source:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        t = source.load(name)
        if attr == "weight" and getattr(module, "stored_transposed", False):
            t = t.t().contiguous()
        total += source.entries[name].nbytes
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[attr] = t
    _retie(model)
    return total


def _retie(model: nn.Module) -> None:
    tied = tied_names(model)
    if not tied:
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if not inp.weight.is_meta:
        out.weight = inp.weight


def release(module: nn.Module) -> None:
    """Free a module's tensors (back to the meta device)."""
    module.to("meta")

"""What a streamed run will need, before it starts: the per-layer plan, the output size, peak
memory, disk and wall time.

Sizes come from the shapes alone (each planned layer's packed buffers are built on the meta
device; with a rotation, the tensors it changes are written in float32 and a tied head as its
own table). Memory and time come from a probe: the real run on the first blocks (embedding the
calibration windows when the recipe has some), with the process's peak RSS reset just before
it, on this machine and with this thread count: blocks 0 and 1, and on up to the first block
of each shape (a mixture whose first blocks are dense: up to its first mixture block). Each
block of the run takes the time of the last probed block of its shape (block 0 pays for warming
up, so a later one where there is one); the run's time adds the start-up and set-up the estimate
itself paid, the layers outside the blocks in proportion to their weights, and the output's
bytes at the rates the probe measured for each way they are written after the blocks (whose own
writes are part of the block time): tensors copied from the source, shards assembled, hashed,
plus config and tokenizer. Disk: the work folder's units and
calibration hidden states beside ``--out``, plus the assembled folder (the units are copied
into its shards before the work folder goes). A learned rotation (``rotate.kind: learned``)
trains on the whole float model before the blocks, and end-to-end tuning (``tune``) on the
quantized and the float model after them: their memory is a rough bound from the model's size,
their time is not probed.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.assets import cache_dir
from lowbit.calibration import CalibrationSet
from lowbit.models.checkpoint import write_extras, write_shards
from lowbit.models.families import find_blocks
from lowbit.models.load import source_tokenizer
from lowbit.models.normalize import conv1d_to_linear
from lowbit.models.rotate import Rotator, fitted_rotation
from lowbit.models.source import TensorSource, skeleton
from lowbit.models.tensorfile import write_file
from lowbit.models.verify import file_hashes
from lowbit.models.workdir import WorkFolder
from lowbit.nn import QuantLinear
from lowbit.pipeline.plan import plan_model
from lowbit.pipeline.stream import StreamStore
from lowbit.pipeline.weights import quantize_weights
from lowbit.recipes import Recipe
from lowbit.sysinfo import current_rss_mb, peak_rss_mb, process_seconds, reset_peak_rss

LEARN_COPIES = 6  # float32 model-sized tensors a learned rotation's training holds (rough)
TUNE_COPIES = 4  # tuning, per parameter: the float32 teacher, int8 codes, and the float codes
# and weights each twin's forward keeps for the backward pass (rough; 13 bytes rounded up)


class _Probed(Exception):
    """Raised once the probe block has been written."""


class _ProbeStore(StreamStore):
    """Times each of the first ``probe`` blocks (``seconds``, by index)."""

    probe = 2
    block_start = first_start = 0.0
    seconds: dict[int, float]

    def leave(self, index, name, block, record, hidden, probe=None) -> None:
        super().leave(index, name, block, record, hidden, probe)  # its writes count in the block
        self.seconds[index] = time.perf_counter() - self.block_start
        if index + 1 >= min(self.probe, self.blocks):
            raise _Probed

    def enter(self, name: str, block: nn.Module) -> None:
        self.block_start = time.perf_counter()
        self.first_start = self.first_start or self.block_start
        super().enter(name, block)


def estimate(
    folder: Path,
    name: str,
    recipe: Recipe,
    calibration: CalibrationSet | None,
    hidden_dtype: torch.dtype = torch.float32,
    spill: bool = False,
    canary: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The plan and estimate of streaming ``folder`` through ``recipe`` (see module doc);
    ``canary`` (windows, tokens) adds the canary's passes over the float embedding and head."""
    startup = process_seconds()  # a run pays for the same start-up and imports
    begin = time.perf_counter()
    model = skeleton(folder)
    tensors = TensorSource(folder)
    tensors.check(model)
    conv1d_to_linear(model)
    plan = plan_model(recipe, model)[1]
    prefix, blocks = find_blocks(model)
    formats, qbytes, weights = _formats(model, plan)
    copied, copied_bytes, output = _output(folder, model, tensors, recipe, plan, prefix, qbytes)
    prelude = time.perf_counter() - begin
    shapes = _block_shapes(tensors, prefix, len(blocks))
    firsts = {shape: i for i, shape in reversed(list(enumerate(shapes)))}
    probed = max(min(2, len(blocks)), max(firsts.values()) + 1)  # blocks the probe runs
    probe = _probe(folder, recipe, calibration, prefix, probed, len(blocks), hidden_dtype, spill,
                   copied)  # fmt: skip
    last = {shapes[i]: t for i, t in sorted(probe.pop("block_times").items())}  # warm where can
    outside = [n for n in plan if not n.startswith(prefix + ".")]
    # from the model's shapes: a tied head has no tensor of its own in the source
    outside_params = sum(model.get_submodule(n).weight.numel() for n in outside)
    timed = max(sum(numel for _, numel in shapes[probed - 1]), 1)  # the last probed block's
    seconds = (startup + prelude + probe["setup_seconds"] + sum(last[s] for s in shapes)
               + probe["block_seconds"] * outside_params / timed
               + copied_bytes / _rate(probe, "copy")
               + output / _rate(probe, "assemble") + output / _rate(probe, "hash")
               + probe["extras_seconds"])  # fmt: skip
    rest_mb = probe["baseline_mb"] + 3 * outside_params * 4 / 2**20
    canary_mb = probe["baseline_mb"] + _canary_bytes(model, canary) / 2**20 if canary else 0.0
    params = sum(e.numel for e in tensors.entries.values())
    learn_mb = 0.0
    if recipe.rotate is not None and recipe.rotate.kind == "learned":  # not probed: rough
        # the whole float32 model, its rotated and rounded copies, their gradients, activations
        learn_mb = probe["baseline_mb"] + LEARN_COPIES * params * 4 / 2**20
    tune_mb = 0.0
    if recipe.tune is not None:  # not probed either: the same kind of rough bound
        seqlen = calibration.seqlen if calibration is not None else 512
        tune_mb = probe["baseline_mb"] + _tune_bytes(model.config, recipe, params, seqlen) / 2**20
    return {
        "model": name,
        "params": params,
        "blocks": len(blocks),
        "source_bytes": tensors.nbytes,
        "source_dtypes": sorted({e.dtype for e in tensors.entries.values()}),
        "formats": formats,
        "bits_per_weight": 8 * sum(r["bytes"] for r in formats.values()) / max(weights, 1),
        "output_bytes": output,
        "disk_bytes": _disk(output, model, calibration, hidden_dtype),
        "peak_rss_mb": max(probe["peak_mb"], rest_mb, canary_mb, learn_mb, tune_mb),
        "seconds": seconds,
        "learned_rotation": learn_mb > 0,  # its training time is not in ``seconds``
        "tuning": tune_mb > 0,  # nor is the end-to-end tuning's
        "threads": torch.get_num_threads(),
        "hidden": {"dtype": str(hidden_dtype).removeprefix("torch."), "spilled": spill},
        "probe": probe,
        "layers": {n: s.short() for n, s in plan.items()},
    }


def disk_bytes(
    folder: Path,
    model: nn.Module,
    tensors: TensorSource,
    recipe: Recipe,
    plan: dict,
    calibration: CalibrationSet | None,
    hidden_dtype: torch.dtype,
) -> int:
    """The disk a streamed run of ``model`` (its skeleton, linears as planned) needs beside
    ``--out`` at its end: the work folder's units and hidden states and the assembled folder."""
    prefix, _ = find_blocks(model)
    output = _output(folder, model, tensors, recipe, plan, prefix, _formats(model, plan)[1])[2]
    return _disk(output, model, calibration, hidden_dtype)


def _disk(output: int, model: nn.Module, calibration: CalibrationSet | None,
          dtype: torch.dtype) -> int:  # fmt: skip
    """Units and assembled shards (the output twice) and the work folder's hidden states."""
    return 2 * output + _hidden_bytes(model, calibration, dtype)


def _output(folder: Path, model: nn.Module, tensors: TensorSource, recipe: Recipe, plan: dict,
            prefix: str, qbytes: int) -> tuple[list[str], int, int]:  # fmt: skip
    """The tensors copied from the source, their bytes, and the output's bytes: of the model's
    own tensors only (a checkpoint's others, e.g. GPT-2's causal masks or rotary tables, are
    left out by the run, so by its estimate too)."""
    own = set(model.state_dict())
    in_blocks = {n for n in tensors.entries if n.startswith(prefix + ".")}
    planned = {f"{n}.{part}" for n in plan for part in ("weight", "bias")}  # a quantized
    kept = [n for n in tensors.entries if n in own and n not in planned]  # layer's file: bias
    block_float = sum(tensors.entries[n].numel * 4 for n in kept if n in in_blocks)
    copied = [n for n in kept if n not in in_blocks]  # copied byte for byte from the source
    copied_bytes = _copied_bytes(folder, tensors, recipe, copied, planned)
    return copied, copied_bytes, qbytes + block_float + copied_bytes


def _copied_bytes(folder: Path, tensors: TensorSource, recipe: Recipe, copied: list[str],
                  planned: set[str]) -> int:  # fmt: skip
    """Bytes of the tensors written as read from the source: as stored, or in float32 where a
    rotation changes them (a tied head, unless quantized, then written as its own table)."""
    if recipe.rotate is None:
        return sum(tensors.entries[n].nbytes for n in copied)
    model = skeleton(folder)
    rotator = Rotator(model, fitted_rotation(recipe.rotate, model))
    extra = [n for n, source in rotator.aliases.items() if n not in planned]
    names = {n: rotator.aliases.get(n, n) for n in [*copied, *extra]}
    return sum(tensors.entries[s].numel * 4 if n in rotator.ops else tensors.entries[s].nbytes
               for n, s in names.items() if s in tensors.entries)  # fmt: skip


def _hidden_bytes(model: nn.Module, calibration: CalibrationSet | None,
                  dtype: torch.dtype) -> int:  # fmt: skip
    """The calibration hidden states the work folder holds: those entering the running block
    and those it writes (the resumable run's copy, whether or not spilled)."""
    if calibration is None:
        return 0
    tokens = calibration.samples * calibration.seqlen
    width = getattr(model.config, "hidden_size", 0) or 0
    return 2 * tokens * width * torch.tensor([], dtype=dtype).element_size()


def _tune_bytes(config: Any, recipe: Recipe, params: int, seqlen: int) -> int:
    """End-to-end tuning's memory, roughly: ``TUNE_COPIES`` float32 model-sized tensors, six
    (batch, tokens, vocabulary) float32 logits tensors (both models' logits, their log-softmax,
    the KL and its gradient), and per block what the backward pass keeps per token (about 24
    hidden-sized and 12 MLP-sized vectors and two rows of attention weights per head). Checked
    against two runs on smollm2-135m, batch 2 x 512 tokens: W4 g64 (6.4 GiB resident read
    during the training) and W4A8 (rounded inputs keep more: peak 7.8 GiB); this gives 7.9 GiB
    plus the process's baseline."""
    tokens = recipe.tune.batch_size * seqlen
    hidden = getattr(config, "hidden_size", 0)
    mlp = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 1)
    per_token = 24 * hidden + 12 * mlp + 2 * heads * seqlen
    layers = getattr(config, "num_hidden_layers", 1)
    logits = 6 * tokens * getattr(config, "vocab_size", 0)
    return 4 * (TUNE_COPIES * params + logits + layers * tokens * per_token)


def _canary_bytes(model: nn.Module, canary: tuple[int, int]) -> int:
    """The float32 embedding or head (the larger; once each, in turn) and three copies of
    the canary's (windows, tokens, vocabulary) logits."""
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    largest = max(m.weight.numel() for m in tables if m is not None)
    windows, tokens = canary
    return 4 * largest + 3 * 4 * windows * tokens * model.config.vocab_size


def _formats(model: nn.Module, plan: dict) -> tuple[dict[str, dict], int, int]:
    """Per-format layer counts, weights and bits/weight (codes and block parameters); total
    packed bytes (biases too: they are written) and weights."""
    formats: dict[str, dict] = {}
    total = weights = 0
    for name, spec in plan.items():
        linear = model.get_submodule(name)
        with torch.device("meta"):
            q = QuantLinear(linear.in_features, linear.out_features, spec,
                            linear.bias is not None, layer=name)  # fmt: skip
        nbytes = sum(t.numel() * t.element_size() for t in q.state_dict().values())
        held = q.storage_bytes()  # bits/weight as quantize and inspect count them: no bias
        n = linear.in_features * linear.out_features
        row = formats.setdefault(spec.short(), {"layers": 0, "weights": 0, "bytes": 0})
        row["layers"] += 1
        row["weights"] += n
        row["bytes"] += held["codes"] + held["params"]
        total += nbytes
        weights += n
    for row in formats.values():
        row["bits_per_weight"] = 8 * row["bytes"] / row["weights"]
    return formats, total, weights


def _block_shapes(tensors: TensorSource, prefix: str, blocks: int) -> list[tuple]:
    """Each block's tensors (names within the block, numbers of elements): equal for blocks of
    one shape."""
    shapes: list[list] = [[] for _ in range(blocks)]
    for name, entry in tensors.entries.items():
        index, _, rest = name.removeprefix(prefix + ".").partition(".")
        if name.startswith(prefix + ".") and index.isdigit() and int(index) < blocks:
            shapes[int(index)].append((rest, entry.numel))
    return [tuple(sorted(s)) for s in shapes]


def _probe(folder, recipe, calibration, prefix, probed, blocks, hidden_dtype, spill,
           copied) -> dict:  # fmt: skip
    """Run the first ``probed`` blocks for real into a scratch work folder (each one's time,
    their bytes and peak RSS), then time what the run does after its blocks on a share of the
    work: assembling the units
    into a shard, hashing it, copying untouched tensors from the source (up to 256 MB of
    them), writing config and tokenizer."""
    model = skeleton(folder)
    tensors = TensorSource(folder)
    tensors.check(model)  # (reads renamed and unprefixed names under the model's)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="probe-") as tmp:
        work = WorkFolder(Path(tmp) / "out", {"probe": True})
        store = _ProbeStore(model, tensors, work, prefix, blocks, spill)
        store.probe, store.seconds = probed, {}
        baseline = current_rss_mb()
        reset_peak_rss()
        start = time.perf_counter()
        with contextlib.suppress(_Probed):
            quantize_weights(model, recipe, calibration, progress=False, store=store,
                             hidden_dtype=hidden_dtype)  # fmt: skip
        peak = peak_rss_mb() or current_rss_mb()
        finishing = _finishing(work, min(store.probe, blocks), folder, model, tensors, copied)
    return {
        "setup_seconds": store.first_start - start,
        "blocks": probed,
        "block_seconds": store.seconds[probed - 1],  # the last probed block's
        "block_times": store.seconds,
        "write_bytes": work.bytes_written,
        **finishing,
        "baseline_mb": baseline,
        "peak_mb": peak,
    }


def _finishing(work, units, folder, model, tensors, copied) -> dict[str, float]:
    final = work.path / "probe-final"
    final.mkdir()
    out: dict[str, float] = {}
    start = time.perf_counter()
    names = write_shards(final, work.units(units))
    out["assemble_seconds"] = time.perf_counter() - start
    out["assemble_bytes"] = out["hash_bytes"] = sum((final / n).stat().st_size for n in names)
    start = time.perf_counter()
    file_hashes(final, names)
    out["hash_seconds"] = time.perf_counter() - start
    sample, size = {}, 0
    for name in copied:
        if size >= 256 * 2**20:
            break
        sample[name] = tensors.entries[name]
        size += tensors.entries[name].nbytes
    start = time.perf_counter()
    out["copy_bytes"] = write_file(final / "copied.safetensors", sample, {}) if sample else 0
    out["copy_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    write_extras(final, model, source_tokenizer(folder))
    out["extras_seconds"] = time.perf_counter() - start
    return out


def _rate(probe: dict[str, float], what: str) -> float:
    """Bytes per second the probe measured for ``what`` (copy, assemble, hash)."""
    return max(probe[f"{what}_bytes"], 1) / max(probe[f"{what}_seconds"], 1e-3)

"""Typed, validated descriptions of one quantized tensor: its format, grid, granularity, range.

These are the leaves of a recipe (``weights:`` and ``activations:``); every algorithm, module and
writer reads them. YAML shorthands are normalised here: ``group_size: -1`` means per-channel,
``observer: mse`` means ``observer: {name: mse}``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lowbit.errors import LowbitError
from lowbit.formats.qtype import FIXED_FORMATS, QType, qtype_for
from lowbit.typed import from_mapping, to_mapping

ObserverName = Literal["minmax", "percentile", "mse", "entropy", "meanstd", "hqq"]
Format = Literal["int", "kmeans", "nf4", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]


@dataclass(frozen=True)
class ObserverSpec:
    """How the range [lo, hi] of a block is chosen before the grid is laid over it.

    minmax: the block's extremes. percentile: the ``percentile``-th and (100-p)-th values.
    mse: shrink the min-max range by the factor in ``[1 - max_shrink, 1]`` (``grid`` steps) that
    minimises the ``norm``-power error. entropy: the clipping threshold whose quantized histogram
    (``bins`` bins) has the least KL divergence from the original (TensorRT-style).
    meanstd: mean ± ``k`` standard deviations ("dynamic range scaling").
    hqq: half-quadratic optimisation of scale/zero for the error sum |x - q(x)|^hqq_p
    (``hqq_iters`` steps, penalty ``hqq_beta`` growing by ``hqq_kappa``); integer grids only.
    """

    name: ObserverName = "minmax"
    percentile: float = 99.9
    k: float = 3.0
    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4
    bins: int = 2048
    hqq_p: float = 0.7
    hqq_beta: float = 10.0
    hqq_kappa: float = 1.01
    hqq_iters: int = 20

    def __post_init__(self) -> None:
        for key, value in to_mapping(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise LowbitError(f"observer.{key} must be a finite number, got {value}")
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"observer.percentile must be in (50, 100], got {self.percentile}")
        if self.k <= 0:
            raise LowbitError(f"observer.k must be positive, got {self.k}")
        if self.grid < 1 or not 0.0 <= self.max_shrink < 1.0:
            raise LowbitError("observer.grid must be >= 1 and observer.max_shrink in [0, 1)")
        if self.norm <= 0 or self.bins < 16:
            raise LowbitError("observer.norm must be positive and observer.bins >= 16")
        if not 0 < self.hqq_p <= 1 or self.hqq_beta <= 0 or self.hqq_iters < 1:
            raise LowbitError("observer.hqq_p must be in (0, 1], hqq_beta > 0, hqq_iters >= 1")
        if self.hqq_kappa <= 1:
            raise LowbitError(f"observer.hqq_kappa must be above 1 (the penalty's growth per "
                              f"step), got {self.hqq_kappa}")  # fmt: skip


def _observer(value: Any, where: str) -> ObserverSpec:
    if isinstance(value, str):
        value = {"name": value}
    return from_mapping(ObserverSpec, value, where)


@dataclass(frozen=True)
class WeightSpec:
    """How a weight matrix (out_features, in_features) is quantized.

    ``granularity`` is ``tensor``, ``channel`` (one scale per output row) or ``group`` (one scale
    per ``group_size`` consecutive inputs of a row). Asymmetric integer grids keep a per-block
    zero: ``zero_point: float`` stores it as an fp16 offset (``x = u*scale + zero``, exact for
    GGUF Q4_1-style checkpoints), ``int`` as an integer code (``x = (u - zero)*scale``, as in
    GPTQ/AWQ checkpoints and compressed-tensors). ``lorc_rank`` > 0 adds a low-rank fp16
    correction of the quantization error (LoRC, :mod:`lowbit.algorithms.lorc`).
    """

    bits: int = 4
    format: Format = "int"
    symmetric: bool | None = None
    granularity: Literal["tensor", "channel", "group"] | None = None
    group_size: int | None = 64
    observer: ObserverSpec = field(default_factory=ObserverSpec)
    zero_point: Literal["float", "int"] = "float"
    scale_dtype: ScaleDtype = "float16"
    lorc_rank: int = 0

    def __post_init__(self) -> None:
        if self.lorc_rank < 0:
            raise LowbitError(f"lorc_rank must be >= 0, not {self.lorc_rank}")
        qtype = qtype_for(self.format, self.bits)
        symmetric = self.symmetric
        if symmetric is None:
            symmetric = qtype.kind != "int"
        if not symmetric and qtype.kind != "int":
            raise LowbitError(f"format {self.format} is symmetric only; drop symmetric: false")
        if symmetric and qtype.kind == "int" and self.bits < 2:
            raise LowbitError("a symmetric 1-bit integer grid has no level but zero; use bits: 2 "
                              "or more, or symmetric: false")  # fmt: skip
        granularity, group_size = _granularity(self.granularity, self.group_size)
        if qtype.kind == "float":
            granularity, group_size = "tensor", None
        object.__setattr__(self, "symmetric", symmetric)
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "group_size", group_size)

    @property
    def qtype(self) -> QType:
        return qtype_for(self.format, self.bits)

    @property
    def has_zero(self) -> bool:
        """Whether a per-block zero point / offset is stored."""
        return self.qtype.kind == "int" and not self.symmetric

    @property
    def has_scale(self) -> bool:
        return self.qtype.kind != "float"

    def short(self) -> str:
        """Compact human name, e.g. ``int4-asym-g64`` or ``nf4-g64`` or ``int8-sym-channel``."""
        if self.qtype.kind == "float":
            return self.format
        name = f"{self.format}{self.bits}" if self.format in ("int", "kmeans") else self.format
        if self.format == "int":
            name += "-sym" if self.symmetric else "-asym"
        tail = {"tensor": "tensor", "channel": "channel"}.get(self.granularity or "")
        lorc = f"+lorc{self.lorc_rank}" if self.lorc_rank else ""
        return f"{name}-{tail or f'g{self.group_size}'}{lorc}"

    def replace(self, **changes: Any) -> WeightSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Any, where: str = "weights") -> WeightSpec:
        whole = isinstance(data, dict) and data.get("granularity") in ("tensor", "channel")
        if whole and data.get("group_size") not in (None, -1):
            raise LowbitError(f"{where}: group_size {data['group_size']} and granularity "
                              f"{data['granularity']} contradict each other; give one of "
                              f"them")  # fmt: skip
        if isinstance(data, dict) and "bits" not in data and data.get("format") in FIXED_FORMATS:
            data = {**data, "bits": FIXED_FORMATS[data["format"]][1]}  # fp16, nf4, ...: its width
        if isinstance(data, dict) and isinstance(data.get("observer"), (str, dict)):
            data = {**data, "observer": _observer(data["observer"], f"{where}.observer")}
        return from_mapping(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        out = to_mapping(self)
        if self.granularity == "channel":
            out["group_size"] = -1
        if not self.lorc_rank:
            out.pop("lorc_rank")  # manifests of plain layers stay as they were
        return out


def _granularity(granularity: str | None, group_size: int | None) -> tuple[str, int | None]:
    """Resolve the (granularity, group_size) pair, accepting ``group_size: -1`` for channel."""
    if granularity is None:
        if group_size is None or group_size == 0:
            raise LowbitError("give group_size (N > 0, or -1 for per-channel)")
        granularity = "channel" if group_size == -1 else "group"
    if granularity == "group":
        if group_size is None or group_size <= 0:
            raise LowbitError(f"group_size must be a positive integer, got {group_size}")
        return "group", group_size
    return granularity, None


@dataclass(frozen=True)
class ActivationSpec:
    """How the inputs of a linear layer are quantized at run time (integer grids, 4 or 8 bits).

    ``granularity: token`` with ``dynamic: true`` computes one range per row (token) as the input
    arrives (ZeroQuant); ``granularity: tensor`` uses one range for the whole input: computed at
    run time (``dynamic: true``) or calibrated once beforehand with ``observer``
    (``dynamic: false``, static) and stored with the model. Asymmetric grids keep an integer zero.
    ``step_groups`` (static only): that many calibrated ranges, one per equal slice of a diffusion
    sampler's timestep axis (see :mod:`lowbit.nn.steps`).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Literal["token", "tensor"] = "token"
    dynamic: bool = True
    observer: ObserverSpec = field(default_factory=ObserverSpec)
    step_groups: int = 1

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise LowbitError(
                f"bits must be 4 or 8 (the widths with a reference and kernels), got {self.bits}"
            )
        if self.granularity == "token" and not self.dynamic:
            raise LowbitError("per-token ranges are dynamic; set dynamic: true")
        if self.observer.name == "hqq":
            raise LowbitError("observer: hqq fits weights only; use minmax, "
                              "percentile, mse, entropy or meanstd")  # fmt: skip
        groups = self.step_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= 1000:
            raise LowbitError(f"step_groups must be an integer from 1 to 1000, got "
                              f"{groups!r}")  # fmt: skip
        if groups > 1 and self.dynamic:
            raise LowbitError("step_groups: per-step ranges are calibrated; set "
                              "dynamic: false")  # fmt: skip

    @property
    def static(self) -> bool:
        """Whether the range is calibrated once and stored (not computed per input)."""
        return not self.dynamic

    def as_dynamic(self) -> ActivationSpec:
        """This grid with its range taken from each input: a static spec becomes per-tensor
        dynamic (how training and searches see static layers before calibration)."""
        return self if self.dynamic else ActivationSpec(self.bits, self.symmetric, "tensor", True)

    @property
    def qtype(self) -> QType:
        return qtype_for("int", self.bits)

    def short(self) -> str:
        mode = "dyn" if self.dynamic else f"static-{self.observer.name}"
        mode += f"-steps{self.step_groups}" if self.step_groups > 1 else ""
        return f"a{self.bits}-{'sym' if self.symmetric else 'asym'}-{self.granularity}-{mode}"

    @classmethod
    def from_dict(cls, data: Any, where: str = "activations") -> ActivationSpec:
        if isinstance(data, dict) and isinstance(data.get("observer"), (str, dict)):
            data = {**data, "observer": _observer(data["observer"], f"{where}.observer")}
        return from_mapping(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


@dataclass(frozen=True)
class AttentionSpec:
    """How attention's inputs are rounded at run time: the key/value cache and the queries.

    ``kv_bits``: keys and values stored on an asymmetric integer grid (2 to 8 bits), one range
    per token, head and ``group_size`` channels along the head dimension (``-1``: the whole
    head), float16 scale and minimum (KIVI-style per-token ranges); or ``16``: stored as
    float16 (llama.cpp's default cache, half a float32 cache's bytes), which takes none of
    the other options. ``query_bits``: queries
    rounded the same way before the scores (4-bit attention needs both). ``hadamard``: keys,
    queries and values are multiplied by an orthonormal Hadamard matrix over the head dimension
    before they are rounded (the scores and the output are unchanged in exact arithmetic:
    (qH)(kH)ᵀ = qkᵀ, and the output is rotated back); it spreads a few large channels over
    all of them, as QuaRot does for its 4-bit KV cache. ``center_keys``: every layer's keys
    are stored minus a per-channel centre (one per key head, the mean of its keys on the
    calibration text, measured when the model is quantized and saved with it): a few channels
    with a large common offset otherwise decide every key's range. The scores are unchanged in
    exact arithmetic (q·(k − c) differs from q·k by the same amount for every key of a query,
    which softmax ignores), as SageAttention's key smoothing; a fixed, calibrated centre keeps
    the cache causal and a stored key the same at every step.
    """

    kv_bits: int | None = None
    group_size: int = -1
    query_bits: int | None = None
    hadamard: bool = False
    center_keys: bool = False

    def __post_init__(self) -> None:
        for key in ("kv_bits", "query_bits"):
            bits = getattr(self, key)
            if bits is None or (isinstance(bits, int) and 2 <= bits <= 8):
                continue
            if key == "kv_bits" and bits == 16 and isinstance(bits, int):
                continue
            also = " (or 16: float16)" if key == "kv_bits" else ""
            raise LowbitError(f"attention.{key} must be an integer from 2 to 8{also}, got {bits!r}")
        others = self.group_size != -1 or self.query_bits is not None or self.hadamard
        if self.float16 and (others or self.center_keys):
            raise LowbitError("attention.kv_bits 16 stores float16 keys and values as they are; "
                              "group_size, query_bits, hadamard and center_keys round to "
                              "integer codes (kv_bits 2 to 8)")  # fmt: skip
        if self.kv_bits is None and self.query_bits is None:
            raise LowbitError("attention: give kv_bits and/or query_bits")
        if self.group_size != -1 and self.group_size < 1:
            raise LowbitError(f"attention.group_size must be -1 or positive, got {self.group_size}")
        if self.center_keys and self.kv_bits is None:
            raise LowbitError("attention.center_keys centres the cached keys; give kv_bits too")

    @property
    def float16(self) -> bool:
        """Whether the cache stores float16 keys and values (``kv_bits`` 16) rather than codes."""
        return self.kv_bits == 16

    @property
    def codes(self) -> bool:
        """Whether the cache stores integer codes (``kv_bits`` 2 to 8)."""
        return self.kv_bits is not None and not self.float16

    def group(self, head_dim: int) -> int:
        """Channels per range for heads of ``head_dim`` (checked to divide it)."""
        g = head_dim if self.group_size == -1 else self.group_size
        if head_dim % g:
            raise LowbitError(f"attention.group_size (--kv-group) {g} does not divide the head "
                              f"dimension {head_dim}; use a divisor of it or -1")  # fmt: skip
        return g

    def bytes_per_value(self, head_dim: int) -> float:
        """Bytes one cached key or value of one head takes (codes, float16 scale and minimum)."""
        if self.kv_bits is None:
            return 4.0 * head_dim
        if self.float16:
            return 2.0 * head_dim
        groups = head_dim // self.group(head_dim)
        return head_dim * _stored_bits(self.kv_bits) / 8 + 4 * groups

    def short(self) -> str:
        parts = [f"kv{self.kv_bits}"] if self.kv_bits is not None else []
        if self.group_size != -1:
            parts.append(f"g{self.group_size}")
        if self.query_bits is not None:
            parts.append(f"q{self.query_bits}")
        if self.hadamard:
            parts.append("had")
        if self.center_keys:
            parts.append("ctr")
        return "-".join(parts)

    @classmethod
    def from_dict(cls, data: Any, where: str = "attention") -> AttentionSpec:
        return from_mapping(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def _stored_bits(bits: int) -> int:
    """Bits a cached code occupies: two codes of up to 4 bits share a byte, wider ones take one."""
    return 4 if bits <= 4 else 8

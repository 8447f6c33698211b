"""Recipes: which algorithm, which format, and which layers get what.

Per-layer choice is data: an ordered list of overrides, each matching layer names exactly or by
regular expression (``re:<pattern>``, full match). Precedence: ``ignore`` beats everything (the
layer stays in float); then the first override whose exact name matches; then the first regex
override that matches, in order; then the recipe's default ``weights``. An override's ``weights``
is merged over the default (``{bits: 8}`` changes only the bits); ``weights: null`` leaves the
layer in float.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lowbit.algorithms.autoround import AutoRoundOptions
from lowbit.algorithms.awq import AWQOptions
from lowbit.algorithms.gptq import GPTQOptions
from lowbit.algorithms.lkd import LKDOptions
from lowbit.algorithms.rotate import RotateOptions
from lowbit.algorithms.smoothquant import SmoothQuantOptions
from lowbit.algorithms.tune import TuneOptions
from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, AttentionSpec, WeightSpec
from lowbit.typed import from_mapping, to_mapping

log = logging.getLogger(__name__)
RECIPE_VERSION = 1
Algorithm = Literal[
    "rtn", "hqq", "gptq", "awq", "awq+gptq", "kmeans", "autoround", "awq+autoround"
]  # fmt: skip
_KEYS = ("version", "name", "algorithm", "weights", "activations", "attention", "rotate",
         "ignore", "overrides", "gptq", "awq", "autoround", "lorc", "smoothquant",
         "lkd", "tune")  # fmt: skip


@dataclass(frozen=True)
class Override:
    """``weights``: a partial mapping merged over the default, ``{}`` for the default itself,
    or None to leave matching layers in float."""

    match: str
    weights: dict[str, Any] | None = field(default_factory=dict)

    @property
    def is_regex(self) -> bool:
        return self.match.startswith("re:")

    def matches(self, name: str) -> bool:
        if self.is_regex:
            return re.fullmatch(self.match[3:], name) is not None
        return name == self.match


@dataclass(frozen=True)
class Recipe:
    """A validated quantization recipe (see the module docstring for precedence).

    ``algorithm``: ``rtn`` (round to nearest), ``hqq`` (RTN with HQQ-optimised ranges, no data),
    ``gptq``, ``awq`` (scales + output-error clipping + RTN), ``awq+gptq`` (AWQ scales, then
    GPTQ), ``kmeans`` (a fitted codebook per block instead of a uniform grid; weighted by the
    Hessian diagonal when calibration data is given), ``autoround`` (learned rounding and
    clipping, block by block), ``awq+autoround`` (AWQ scales, then AutoRound); ``gptq``,
    ``awq`` and ``autoround`` hold those algorithms' options. ``activations`` rounds the
    inputs of every quantized layer at run time;
    ``attention`` rounds the key/value cache (and queries) at run time, saved with the model.
    ``rotate`` folds an orthogonal rotation of the residual stream (and of each head's values)
    into the float weights before anything else (QuaRot; kind ``learned``: SpinQuant's matrix,
    trained on the calibration text first); the model computes the same function.
    ``smoothquant`` (SmoothQuant scales folded in before the weights are quantized) and ``lkd``
    (layer-wise distillation of each quantized block afterwards) compose with any algorithm
    except that SmoothQuant and AWQ both rescale channels, so only one of them may be used.
    ``tune`` (end-to-end tuning of the scales and offsets towards the float model, codes fixed)
    runs once every layer is quantized, after any algorithm.
    """

    algorithm: Algorithm = "rtn"
    weights: WeightSpec | None = field(default_factory=WeightSpec)
    activations: ActivationSpec | None = None
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    name: str | None = None
    version: int = RECIPE_VERSION
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    autoround: AutoRoundOptions = field(default_factory=AutoRoundOptions)
    smoothquant: SmoothQuantOptions | None = None
    lkd: LKDOptions | None = None
    attention: AttentionSpec | None = None
    rotate: RotateOptions | None = None
    tune: TuneOptions | None = None

    def __post_init__(self) -> None:
        if self.tune is not None and self.activations is not None and self.activations.static:
            raise LowbitError(
                "tune trains scales under dynamic activation rounding; static "
                "ranges would not be measured again: drop tune"
            )
        if self.smoothquant is not None and self.algorithm.startswith("awq"):
            raise LowbitError("smoothquant and awq both rescale input channels; use one of them "
                              "(e.g. smoothquant with algorithm: gptq)")  # fmt: skip
        if self.lkd is not None and self.algorithm == "kmeans":
            raise LowbitError("lkd trains uniform integer grids; K-means codebooks are not one")
        for pattern in (*self.ignore, *(o.match for o in self.overrides)):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise LowbitError(f"recipe: bad regex {pattern!r}: {exc}") from None
        specs = [("weights", self.weights)]
        for i, override in enumerate(self.overrides):
            where = f"overrides[{i}].weights"
            specs.append((where, self._merged(override, where)))  # validate eagerly
        if self.algorithm.endswith("autoround"):
            for where, spec in specs:
                _learnable(spec, where)

    def spec_for(self, name: str, alias: str | None = None) -> WeightSpec | None:
        """The weight spec of layer ``name``, or None to leave it in float. ``alias``: a second
        name the layer answers to (``lm_head`` for a model's output head under another name,
        such as BioGPT's ``output_projection``)."""
        names = (name,) if alias is None else (name, alias)
        if any(_match(p, n) for p in self.ignore for n in names):
            return None
        exact = [o for o in self.overrides if not o.is_regex and any(map(o.matches, names))]
        regex = [o for o in self.overrides if o.is_regex and any(map(o.matches, names))]
        chosen = (exact or regex or [None])[0]
        if chosen is None:
            return self.weights
        return self._merged(chosen, f"override {chosen.match!r}")

    def _merged(self, override: Override, where: str) -> WeightSpec | None:
        if override.weights is None:
            return None
        if not override.weights:
            if self.weights is None:
                raise LowbitError(f"{where}: no default weights to inherit; give the format")
            return self.weights
        base = self.weights.to_dict() if self.weights is not None else {}
        given = dict(override.weights)
        observer = given.get("observer")
        if isinstance(observer, (str, dict)) and isinstance(base.get("observer"), dict):
            # an override changes only the observer keys it gives, as for the other keys
            observer = {"name": observer} if isinstance(observer, str) else observer
            given["observer"] = {**base["observer"], **observer}
        if "group_size" in given and "granularity" not in given:
            base.pop("granularity", None)  # let group_size: -1 / N decide it again
        if "granularity" in given and "group_size" not in given:
            base.pop("group_size", None)  # (channel / tensor: the default's groups go)
        if "format" in given:  # a new format brings its own width and symmetry
            for key in ("bits", "symmetric", "zero_point"):
                if key not in given:
                    base.pop(key, None)
        return WeightSpec.from_dict({**base, **given}, where)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.name:
            out["name"] = self.name
        out["algorithm"] = self.algorithm
        out["weights"] = None if self.weights is None else self.weights.to_dict()
        out["activations"] = None if self.activations is None else self.activations.to_dict()
        if self.attention is not None:
            out["attention"] = self.attention.to_dict()
        if self.rotate is not None:
            out["rotate"] = to_mapping(self.rotate)
        out["ignore"] = list(self.ignore)
        out["overrides"] = [{"match": o.match, "weights": o.weights} for o in self.overrides]
        if self.algorithm in ("gptq", "awq+gptq"):
            out["gptq"] = to_mapping(self.gptq)
        if self.algorithm.startswith("awq"):
            out["awq"] = to_mapping(self.awq)
        if self.algorithm.endswith("autoround"):
            out["autoround"] = to_mapping(self.autoround)
        if self.smoothquant is not None:
            out["smoothquant"] = to_mapping(self.smoothquant)
        if self.lkd is not None:
            out["lkd"] = to_mapping(self.lkd)
        if self.tune is not None:
            out["tune"] = to_mapping(self.tune)
        return out

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this recipe needs calibration windows."""
        static = self.activations is not None and self.activations.static
        calibrated = self.algorithm in ("gptq", "awq", "awq+gptq", "autoround", "awq+autoround")
        centers = self.attention is not None and self.attention.center_keys
        steps = self.smoothquant is not None or self.lkd is not None
        learned = self.rotate is not None and self.rotate.kind == "learned"
        return calibrated or static or centers or steps or learned or self.tune is not None

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise LowbitError(f"{where}: expected a mapping at the top level")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            raise LowbitError(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(_KEYS)})")
        version = data.get("version")
        if type(version) is not int or version != RECIPE_VERSION:  # (True == 1 in Python)
            raise LowbitError(f"{where}: version must be {RECIPE_VERSION}, got {version!r}")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise LowbitError(f"{where}: name: expected a string, got {name!r} (quote it)")
        algorithm = data.get("algorithm", "rtn")
        if algorithm not in Algorithm.__args__:
            known = ", ".join(Algorithm.__args__)
            raise LowbitError(f"{where}: unknown algorithm {algorithm!r} (known: {known})")
        _unused_options(data, algorithm, where)
        at = f"{where}: " if not where.endswith(":") else f"{where} "  # "recipe.yaml: gptq.damp"
        weights = _with_lorc(data.get("weights", {}), data.get("lorc"), at)
        acts, attention = data.get("activations"), data.get("attention")
        return cls(
            algorithm=algorithm,
            weights=None if weights is None else WeightSpec.from_dict(weights, f"{at}weights"),
            activations=None if acts is None else ActivationSpec.from_dict(
                acts, f"{at}activations"),
            ignore=tuple(_str_list(data.get("ignore", []), f"{at}ignore")),
            overrides=tuple(_override(o, f"{at}overrides[{i}]")
                            for i, o in enumerate(data.get("overrides") or [])),
            name=name,
            version=version,
            gptq=from_mapping(GPTQOptions, data.get("gptq") or {}, f"{at}gptq"),
            awq=from_mapping(AWQOptions, data.get("awq") or {}, f"{at}awq"),
            autoround=from_mapping(AutoRoundOptions, data.get("autoround") or {}, f"{at}autoround"),
            smoothquant=_optional(SmoothQuantOptions, data, "smoothquant", at),
            lkd=_optional(LKDOptions, data, "lkd", at),
            attention=None if attention is None else AttentionSpec.from_dict(
                attention, f"{at}attention"),
            rotate=_optional(RotateOptions, data, "rotate", at),
            tune=_optional(TuneOptions, data, "tune", at),
        )  # fmt: skip


def _unused_options(data: dict, algorithm: str, where: str) -> None:
    """Warn about an algorithm's options block that this recipe's algorithm does not read (it
    would be dropped from the saved recipe without a word)."""
    steps = data.get("smoothquant") is not None or data.get("lkd") is not None
    readers = {
        "gptq": ("gptq", "awq+gptq", "kmeans", "autoround", "awq+autoround", "awq")
        + (("rtn", "hqq") if steps else ()),  # (its true_sequential groups every block's layers)
        "awq": ("awq", "awq+gptq", "awq+autoround") + (("rtn", "hqq") if steps else ()),
        "autoround": ("autoround", "awq+autoround"),
    }
    for key, algorithms in readers.items():
        if data.get(key) and algorithm not in algorithms:
            log.warning("%s: %s: options for another algorithm (%s); this recipe's algorithm "
                        "is %s, so they are ignored", where, key, algorithms[0],
                        algorithm)  # fmt: skip


def _learnable(spec: WeightSpec | None, where: str) -> None:
    """AutoRound learns the rounding of uniform integer grids, without LoRC factors."""
    if spec is None:
        return
    if spec.format != "int":
        raise LowbitError(f"{where}: autoround learns rounding on integer grids, not "
                          f"{spec.format}; use format: int (2 to 8 bits)")  # fmt: skip
    if spec.lorc_rank:
        raise LowbitError(f"{where}: autoround does not fit LoRC factors; drop lorc_rank "
                          f"(or use algorithm: gptq)")  # fmt: skip


def _optional(cls: type, data: dict, key: str, where: str) -> Any:
    """An options block that switches a step on when present (``{}``: its defaults)."""
    if key not in data or data[key] is None:
        return None
    return from_mapping(cls, data[key], f"{where}{key}")


def _with_lorc(weights: Any, lorc: Any, at: str) -> Any:
    """``lorc: {rank: r}`` is shorthand for ``weights: {lorc_rank: r}`` (the default layers; an
    override can set its own ``lorc_rank``, 0 to drop the correction)."""
    if lorc is None:
        return weights
    if not isinstance(lorc, dict) or set(lorc) - {"rank"} or not isinstance(lorc.get("rank"), int):
        raise LowbitError(f"{at}lorc: expected {{rank: N}}")
    if not isinstance(weights, dict):
        raise LowbitError(f"{at}lorc: needs default weights to correct")
    return {**weights, "lorc_rank": lorc["rank"]}


def _match(pattern: str, name: str) -> bool:
    return Override(pattern).matches(name)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LowbitError(f"{where}: expected a list of layer names or re: patterns")
    return value


def _override(data: Any, where: str) -> Override:
    if not isinstance(data, dict) or "match" not in data:
        raise LowbitError(f"{where}: expected a mapping with a 'match' key")
    unknown = [k for k in data if k not in ("match", "weights")]
    if unknown:
        raise LowbitError(f"{where}: unknown key {unknown[0]!r} (expected: match, weights)")
    weights = data.get("weights", {})
    if weights is not None and not isinstance(weights, dict):
        raise LowbitError(f"{where}.weights: expected a mapping or null")
    return Override(str(data["match"]), weights)

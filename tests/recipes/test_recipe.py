import pytest

from lowbit.errors import LowbitError
from lowbit.formats import WeightSpec
from lowbit.recipes import Recipe, recipe_from_yaml, recipe_to_yaml

YAML = r"""
version: 1
algorithm: rtn
weights: {bits: 4, symmetric: false, group_size: 64, observer: minmax}
activations: null
ignore: [lm_head]
overrides:
  - {match: "re:.*\\.down_proj$", weights: {bits: 8}}
  - {match: "model.layers.0.mlp.down_proj", weights: {bits: 3}}
  - {match: "re:.*\\.(k|v)_proj$", weights: null}
  - {match: "re:model\\.layers\\.1\\..*", weights: {group_size: -1}}
"""


def test_precedence_ignore_exact_regex_default():
    r = recipe_from_yaml(YAML)
    assert r.spec_for("lm_head") is None
    assert r.spec_for("model.layers.0.mlp.down_proj").bits == 3  # exact beats earlier regex
    assert r.spec_for("model.layers.5.mlp.down_proj").bits == 8  # first regex in order
    assert r.spec_for("model.layers.1.mlp.down_proj").bits == 8  # ... even if a later one matches
    assert r.spec_for("model.layers.2.self_attn.k_proj") is None  # weights: null = float
    per_channel = r.spec_for("model.layers.1.mlp.up_proj")
    assert per_channel.granularity == "channel" and per_channel.bits == 4
    assert r.spec_for("model.layers.2.mlp.up_proj") == WeightSpec(bits=4, group_size=64)


def test_yaml_round_trip():
    r = recipe_from_yaml(YAML)
    assert recipe_from_yaml(recipe_to_yaml(r)) == r


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("algorithm: rtn\n", "version must be 1"),
        ("version: 1\nalgoritm: rtn\n", "unknown key 'algoritm'"),
        ("version: 1\nalgorithm: magic\n", "unknown algorithm 'magic'"),
        ("version: 1\nweights: {bits: 12}\n", "1 to 8 bits"),
        ("version: 1\noverrides: [{match: 're:(', weights: {bits: 8}}]\n", "bad regex"),
        ("version: 1\noverrides: [{match: x, weights: {bits: 0}}]\n", r"overrides\[0\]"),
        ("version: 1\nignore: lm_head\n", "list of layer names"),
        ("version: 1\nweights: {bits: 4\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping at the top level"),
        ("version: 1\nattention: {kv_bits: 9}\n", "attention.kv_bits must be"),
        ("version: 1\nattention: {kv_bit: 4}\n", "unknown key 'kv_bit'"),
        ("version: 1\nrotate: {kind: givens}\n", "rotate.kind: .givens. is not one of"),
        ("version: true\n", "version must be 1, got True"),
        ("version: 1\nweights: {granularity: channel, group_size: 64}\n", "contradict each"),
        ("version: 1\nweights: {bits: 4}\nweights: {bits: 8}\n", "key 'weights' given twice"),
        ("version: 1\nname: 2024-01-01\n", "name: expected a string"),
        ("version: 1\nweights: {bits: 1, symmetric: true, group_size: 32}\n", "no level but"),
        (
            "version: 1\nweights: {group_size: 32, observer: {name: meanstd, k: .nan}}\n",
            "observer.k must be a finite number",
        ),
        (
            "version: 1\nweights: {group_size: 32, observer: {name: hqq, hqq_kappa: 1}}\n",
            "hqq_kappa must be above 1",
        ),
    ],
)
def test_invalid_recipes_give_one_line_errors(text, message):
    with pytest.raises(LowbitError, match=message) as info:
        recipe_from_yaml(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 1\nweights: {bits: four}\n", "r.yaml: weights.bits: expected int, got 'four'"),
        ("version: 1\nlorc: 3\nweights: {bits: 4}\n", "r.yaml: lorc: expected {rank: N}"),
        (
            "version: 1\nweights: {bits: 8}\nactivations: {bits: 9}\n",
            "r.yaml: activations: bits must be 4 or 8",
        ),
    ],
)
def test_errors_name_the_file_then_the_key(text, message):
    """ "r.yaml: weights.bits", not "r.yaml.bits" (the file name joined to the key)."""
    with pytest.raises(LowbitError) as info:
        recipe_from_yaml(text, "r.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_activations_go_with_any_weights():
    with pytest.raises(LowbitError, match="4 or 8"):
        recipe_from_yaml("version: 1\nactivations: {bits: 6}\n")
    w4a8 = recipe_from_yaml(
        "version: 1\nweights: {bits: 4, group_size: 64}\nactivations: {bits: 8}\n"
    )
    assert w4a8.activations.granularity == "token" and not w4a8.needs_calibration
    static = recipe_from_yaml(
        "version: 1\nactivations: {granularity: tensor, dynamic: false, observer: mse}\n"
    )
    assert static.activations.observer.name == "mse" and static.needs_calibration


def test_format_override_drops_inherited_bits():
    r = Recipe.from_dict({"version": 1, "weights": {"bits": 3, "group_size": 64},
                          "overrides": [{"match": "a", "weights": {"format": "nf4"}}]})  # fmt: skip
    assert r.spec_for("a").format == "nf4" and r.spec_for("a").bits == 4


def test_a_format_alone_brings_its_width():
    """`format: fp16` (or nf4, fp8) without bits is that format's width, at the top level and in
    an override."""
    head = {"match": "lm_head", "weights": {"format": "fp16"}}
    r = Recipe.from_dict({"version": 1, "weights": {"bits": 4, "group_size": 32},
                          "overrides": [head]})  # fmt: skip
    assert r.spec_for("lm_head").bits == 16 and r.spec_for("x").bits == 4
    assert Recipe.from_dict({"version": 1, "weights": {"format": "fp8_e4m3"}}).weights.bits == 8


def test_an_override_changes_only_the_observer_keys_it_gives():
    overrides = [{"match": "x", "weights": {"observer": {"grid": 7}}},
                 {"match": "y", "weights": {"observer": "hqq"}}]  # fmt: skip
    r = Recipe.from_dict({"version": 1, "overrides": overrides,
                          "weights": {"bits": 4, "group_size": 64, "observer": "mse"}})  # fmt: skip
    assert (r.spec_for("x").observer.name, r.spec_for("x").observer.grid) == ("mse", 7)
    assert r.spec_for("y").observer.name == "hqq"


def test_another_algorithms_options_are_named_as_ignored(caplog):
    Recipe.from_dict({"version": 1, "algorithm": "rtn", "gptq": {"damp": 0.5}}, "r.yaml")
    assert "r.yaml: gptq: options for another algorithm (gptq)" in caplog.text
    caplog.clear()
    Recipe.from_dict({"version": 1, "algorithm": "awq+gptq", "gptq": {"damp": 0.5}})
    Recipe.from_dict({"version": 1, "algorithm": "rtn", "awq": {"grid": 10}, "lkd": {}})
    assert "options for another algorithm" not in caplog.text  # read by those


def test_smoothquant_and_lkd_keys():
    r = recipe_from_yaml("version: 1\nalgorithm: gptq\nactivations: {bits: 8}\n"
                         "smoothquant: {}\nlkd: {steps: 10, lr: 1.0e-4}\n")  # fmt: skip
    assert r.smoothquant.alpha is None and r.lkd.steps == 10 and r.needs_calibration
    again = Recipe.from_dict(r.to_dict())
    assert again == r
    with pytest.raises(LowbitError, match="use one of them"):
        recipe_from_yaml("version: 1\nalgorithm: awq\nsmoothquant: {alpha: 0.5}\n")
    with pytest.raises(LowbitError, match="K-means"):
        recipe_from_yaml("version: 1\nalgorithm: kmeans\nlkd: {}\n")
    with pytest.raises(LowbitError, match="smoothquant"):
        recipe_from_yaml("version: 1\nsmoothquant: {alpha: 2}\n")


def test_attention_and_rotate_round_trip():
    text = "version: 1\nrotate: {kind: random, seed: 3}\nattention: {kv_bits: 4, hadamard: true}\n"
    r = recipe_from_yaml(text)
    assert r.rotate.kind == "random" and r.rotate.seed == 3 and r.rotate.heads
    assert r.attention.kv_bits == 4 and r.attention.hadamard
    assert recipe_from_yaml(recipe_to_yaml(r)) == r
    assert not r.needs_calibration

"""Recipes as typed data: presets, first-match / ignores semantics, dict and YAML round trips, validation errors that
name the offending field, and ``load_recipe`` from presets and files. Everything here is exact (no tolerances)."""

import pytest
import yaml

from qmamba.quant.granularity import PerChannel, PerGroup, PerTensor
from qmamba.quant.recipe import RECIPE_PRESETS, ObserverSpec, QuantSpec, Recipe, load_recipe

PRESETS = ("quamba_w8a8", "quamba2_w8a8", "qat_w8a8")
M = "backbone.layers.0.mixer"


def test_presets_load_and_are_named():
    assert set(PRESETS) <= set(RECIPE_PRESETS)
    for name in PRESETS:
        recipe = load_recipe(name)
        assert isinstance(recipe, Recipe)
        assert recipe.name == name
        assert recipe.targets
        # Embedding and lm_head stay fp (DESIGN §4), even if a target pattern were broad.
        assert recipe.spec_for("lm_head.input") is None
        assert recipe.spec_for("backbone.embedding.weight") is None
    assert load_recipe(load_recipe("qat_w8a8")) == load_recipe("qat_w8a8")


def test_quamba_preset_choices():
    r = load_recipe("quamba_w8a8")
    for point in ("in_proj.input", "in_proj.weight", "conv1d.input", "conv1d.weight", "x_proj.weight",
                  "dt_proj.input", "dt_proj.weight", "scan.delta", "scan.B", "scan.C", "scan.z", "out_proj.input",
                  "out_proj.weight"):
        spec = r.spec_for(f"{M}.{point}")
        assert spec is not None and spec.bits == 8 and spec.granularity == PerTensor(), point
    # The scan input u is seen by x_proj and by the scan: one percentile spec for both, so both get the same codes.
    u1, u2 = r.spec_for(f"{M}.x_proj.input"), r.spec_for(f"{M}.scan.u")
    assert u1 == u2 and u1.observer.kind == "percentile" and u1.observer.alpha < 1
    assert r.spec_for(f"{M}.in_proj.input").observer.kind == "minmax"
    assert r.spec_for(f"{M}.A_log") is None
    # Quamba quantizes the out_proj input after a Hadamard rotation; nothing else is rotated.
    for name in PRESETS:
        p = load_recipe(name)
        assert p.spec_for(f"{M}.out_proj.input").rotation == "hadamard", name
        assert p.spec_for(f"{M}.in_proj.input").rotation is None, name


def test_quamba2_and_qat_preset_choices():
    r2 = load_recipe("quamba2_w8a8")
    # x per head, B / C per SSD group: dim -2 of (batch, L, heads | groups, ...)
    for point in ("scan.x", "scan.B", "scan.C"):
        assert r2.spec_for(f"{M}.{point}").granularity == PerChannel(axis=-2), point
    for point in ("scan.dt", "norm.z", "in_proj.input", "out_proj.input"):
        assert r2.spec_for(f"{M}.{point}").granularity == PerTensor(), point
    q = load_recipe("qat_w8a8")
    assert q.spec_for(f"{M}.in_proj.input").learnable_scale
    assert q.spec_for(f"{M}.scan.x").learnable_scale
    w = q.spec_for(f"{M}.out_proj.weight")
    assert w.granularity == PerChannel(axis=0) and not w.learnable_scale


def test_spec_for_first_match_wins_and_ignores_win():
    a, b = QuantSpec(bits=8), QuantSpec(bits=4)
    r = Recipe("t", targets=(("*.in_proj.*", a), ("*.in_proj.input", b), ("*.out_proj.input", b)),
               ignores=("*.layers.1.*",))
    assert r.spec_for(f"{M}.in_proj.input") is a  # first matching pattern, not the more specific later one
    assert r.spec_for(f"{M}.out_proj.input") is b
    assert r.spec_for("backbone.layers.1.mixer.in_proj.input") is None  # ignored although a target matches
    assert r.spec_for("backbone.layers.1.mixer.out_proj.input") is None
    assert r.spec_for(f"{M}.conv1d.input") is None  # unmatched
    assert r.spec_for("in_proj.input") is None  # fnmatch: '*.' needs a prefix


@pytest.mark.parametrize("name", PRESETS)
def test_dict_and_yaml_round_trip(name):
    r = load_recipe(name)
    d = r.to_dict()
    assert Recipe.from_dict(d) == r
    assert load_recipe(d) == r
    text = r.to_yaml()
    assert Recipe.from_dict(yaml.safe_load(text)) == r
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain data only


def test_round_trip_keeps_every_field():
    spec = QuantSpec(bits=4, granularity=PerGroup(16, axis=-1), observer=ObserverSpec("ema", momentum=0.9),
                     learnable_scale=True, rotation="hadamard")
    r = Recipe("custom", targets=(("*.x", spec), ("*.y", QuantSpec(observer=ObserverSpec("percentile", 0.99)))),
               ignores=("a.*", "b.*"))
    back = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert back == r
    assert [p for p, _ in back.targets] == ["*.x", "*.y"]  # order (first match wins) is preserved
    assert back.targets[0][1].granularity == PerGroup(16, axis=-1)
    assert back.targets[1][1].observer == ObserverSpec("percentile", 0.99)


def test_yaml_text_written_by_hand():
    text = """
name: mine
targets:
  "*.mixer.in_proj.input": {observer: {kind: percentile, alpha: 0.999}}
  "*.mixer.out_proj.weight": {granularity: {type: per_channel, axis: 0}, bits: 6}
  "*.mixer.conv1d.input": {}
ignores: ["backbone.layers.1.*"]
"""
    r = load_recipe(yaml.safe_load(text))
    assert r.name == "mine"
    assert r.spec_for(f"{M}.in_proj.input").observer == ObserverSpec("percentile", 0.999)
    w = r.spec_for(f"{M}.out_proj.weight")
    assert (w.bits, w.granularity) == (6, PerChannel(axis=0))
    assert r.spec_for(f"{M}.conv1d.input") == QuantSpec()
    assert r.spec_for("backbone.layers.1.mixer.conv1d.input") is None


def _targets(spec: dict) -> dict:
    return {"name": "bad", "targets": {"*.in_proj.input": spec}}


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "targets": {"*.a": {}}, "ignore": ["b"]}, "ignore"),  # recipe level typo
    (_targets({"bitz": 8}), "bitz"),  # spec level typo
    (_targets({"observer": {"kind": "minmax", "alpah": 0.9}}), "alpah"),  # observer level typo
    (_targets({"observer": {"kind": "histogram"}}), "kind"),
    (_targets({"bits": 9}), "bits"),
    (_targets({"bits": 1}), "bits"),
    (_targets({"bits": 8.5}), "bits"),
    (_targets({"bits": "8"}), "bits"),
    (_targets({"symmetric": False}), "symmetric"),
    (_targets({"observer": {"kind": "percentile", "alpha": 1.5}}), "alpha"),
    (_targets({"granularity": {"type": "per_row"}}), "granularity"),
    (_targets({"rotation": "fourier"}), "rotation"),
    ({"name": "empty", "targets": {}}, "targets"),
])
def test_invalid_recipes_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        Recipe.from_dict(data)


def test_granularity_short_names_from_yaml():
    # granularity_from_dict accepts bare names "for YAML brevity"; a recipe must turn them into types too.
    spec = QuantSpec.from_dict(yaml.safe_load("granularity: per_channel\nbits: 8"))
    assert spec.granularity == PerChannel()
    assert QuantSpec.from_dict({"granularity": "per_tensor"}).granularity == PerTensor()
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_single_ignore_pattern_as_a_string():
    # `ignores: lm_head.*` in YAML is a string, not a list; it must not become one pattern per character
    # (the character '*' would ignore every point).
    r = Recipe.from_dict(yaml.safe_load("targets: {'*.in_proj.input': {}}\nignores: lm_head.*"))
    assert r.ignores == ("lm_head.*",)
    assert r.spec_for(f"{M}.in_proj.input") == QuantSpec()
    assert r.spec_for("lm_head.input") is None


def test_load_recipe_from_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    r = load_recipe("quamba2_w8a8")
    path.write_text(r.to_yaml())
    assert load_recipe(str(path)) == r
    assert load_recipe(path) == r
    yml = tmp_path / "r2.yml"
    yml.write_text("name: two\ntargets:\n  '*.mixer.in_proj.input': {}\n")
    assert load_recipe(str(yml)).name == "two"


def test_load_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError) as e:
        load_recipe("quamba_w4a4")
    for name in PRESETS:
        assert name in str(e.value)
    assert "quamba_w4a4" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\ntargets: {'*.x': {bits: 12}}\n")
    with pytest.raises(ValueError, match="bits"):
        load_recipe(str(bad))

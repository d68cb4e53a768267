"""Tests for chains (presets): loading, YAML round trips, seeded runs, replays, traces and errors.

Inputs are real photos from scikit-image, shrunk to small (and odd) sizes so the suite stays fast.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data
import yaml

import crappify
from crappify import PRESETS, Chain, ConfigError, load_preset
from crappify import functional as F

HR = (64, 48)  # (width, height) of the main test photo
LR = (16, 12)  # HR / 4


def _photo(name: str, width: int, height: int) -> np.ndarray:
    src = getattr(skimage.data, name)()
    return np.ascontiguousarray(cv2.resize(src, (width, height), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def hr() -> np.ndarray:
    return _photo("astronaut", *HR)


@pytest.fixture(scope="module")
def odd() -> np.ndarray:
    return _photo("chelsea", 37, 53)


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    return _photo("coffee", 160, 120)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def chain_of(steps, **extra) -> Chain:
    return Chain.from_dict({"steps": steps, **extra})


PRESET_NAMES = PRESETS.names()


def test_builtin_presets_exist():
    assert {"lesson7", "srgan-x4", "flickr30k-restore", "realistic"} <= set(PRESET_NAMES)
    assert crappify.load_preset is load_preset


# ---------------------------------------------------------------------------------------------------------
# every built-in preset


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_loads(name):
    chain = load_preset(name)
    assert isinstance(chain, Chain)
    assert chain.name == name
    assert chain.steps and chain.description
    assert chain.scale is None or (isinstance(chain.scale, int) and chain.scale >= 1)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_yaml_round_trip(name):
    chain = load_preset(name)
    again = Chain.from_dict(yaml.safe_load(chain.to_yaml()))
    assert again.to_dict() == chain.to_dict()
    assert again.to_yaml() == chain.to_yaml()
    # the file as written and the chain's own form describe the same steps
    raw = yaml.safe_load(PRESETS.get(name).read_text())
    assert chain.to_dict()["steps"] == raw["steps"]
    assert chain.to_dict().get("vars") == raw.get("vars")


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_same_seed_same_result(name, seed, hr):
    chain = load_preset(name)
    a = chain.run(hr, rng(seed), lr_size=LR)
    b = chain.run(hr, rng(seed), lr_size=LR)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.encoded == b.encoded
    assert a.record == b.record
    assert a.image.dtype == np.uint8 and a.image.ndim == 3 and a.image.shape[2] == 3
    if chain.uses_lr_size:
        assert a.image.shape == (LR[1], LR[0], 3)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_preset_replay_reproduces(name, seed, hr):
    before = hr.copy()
    chain = load_preset(name)
    out = chain.run(hr, rng(seed), lr_size=LR)
    np.testing.assert_array_equal(hr, before)
    assert len(out.record["steps"]) == len(chain.steps)
    for record in (out.record, json.loads(json.dumps(out.record, allow_nan=False))):
        again = chain.replay(hr, record)
        np.testing.assert_array_equal(again.image, out.image)
        assert again.encoded == out.encoded
    # a freshly loaded chain replays too (the record alone is enough)
    again = load_preset(name).replay(hr, json.loads(json.dumps(out.record)))
    np.testing.assert_array_equal(again.image, out.image)
    assert again.encoded == out.encoded


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_different_seeds_differ(name, hr):
    chain = load_preset(name)
    records = {json.dumps(chain.run(hr, rng(s), lr_size=LR).record, sort_keys=True) for s in range(6)}
    if name in ("srgan-x4", "bicubic-x2"):
        assert len(records) == 1  # nothing random in a fixed bicubic downscale
    else:
        assert len(records) >= 5


def test_lesson7_writes_its_jpeg_quality(big):
    chain = load_preset("lesson7")
    qualities = set()
    for seed in range(8):
        out = chain.run(big, rng(seed))
        q = out.record["vars"]["q"]
        assert isinstance(q, int) and 10 <= q <= 70
        qualities.add(q)
        resize, text, jpeg = out.record["steps"]
        assert [resize["op"], text["op"], jpeg["op"]] == ["resize", "text", "jpeg"]
        assert text["text"] == str(q)
        assert jpeg["quality"] == q
        assert (resize["width"], resize["height"]) == (128, 96)
        assert isinstance(out.encoded, bytes)
        assert out.encoded[:2] == b"\xff\xd8" and out.encoded[-2:] == b"\xff\xd9"
        np.testing.assert_array_equal(out.image, F.jpeg_decode(out.encoded))
        assert out.image.shape == (96, 128, 3)
    assert len(qualities) >= 5


def test_lesson7_decode_false_leaves_bytes(big):
    out = load_preset("lesson7").run(big, rng(0), decode=False)
    assert out.image is None and out.encoded[:2] == b"\xff\xd8"
    decoded = load_preset("lesson7").run(big, rng(0))
    np.testing.assert_array_equal(F.jpeg_decode(out.encoded), decoded.image)
    replayed = load_preset("lesson7").replay(big, out.record, decode=False)
    assert replayed.image is None and replayed.encoded == out.encoded


def test_srgan_x4_is_exact_quarter(hr, odd):
    chain = load_preset("srgan-x4")
    assert chain.scale == 4 and chain.uses_lr_size
    out = chain.run(hr, rng(0), lr_size=LR)
    assert out.image.shape == (12, 16, 3) and out.encoded is None
    assert out.record["steps"] == [{"op": "resize", "width": 16, "height": 12, "interpolation": "bicubic",
                                    "antialias": True}]
    np.testing.assert_array_equal(out.image, F.resize(hr, 16, 12, "bicubic", True))
    big = _photo("astronaut", 96, 72)
    assert chain.run(big, rng(0), lr_size=(24, 18)).image.shape == (18, 24, 3)
    with pytest.raises(ConfigError):
        chain.run(odd, rng(0), lr_size=None)


def test_uses_lr_size():
    assert load_preset("srgan-x4").uses_lr_size
    assert load_preset("flickr30k-restore").uses_lr_size
    assert load_preset("realistic").uses_lr_size
    assert not load_preset("lesson7").uses_lr_size
    nested = chain_of([{"op": "repeat", "steps": [{"op": "resize", "size": "lr"}]}])
    assert nested.uses_lr_size


# ---------------------------------------------------------------------------------------------------------
# probabilities and repeat


def test_p_zero_step_is_skipped_and_recorded(hr):
    chain = chain_of([{"op": "noise", "p": 0, "sigma": 20}])
    for seed in range(5):
        out = chain.run(hr, rng(seed))
        assert out.record["steps"] == [{"op": "noise", "applied": False}]
        np.testing.assert_array_equal(out.image, hr)
        assert out.encoded is None
        np.testing.assert_array_equal(chain.replay(hr, out.record).image, hr)


def test_p_zero_in_the_middle(hr):
    chain = chain_of([{"op": "desaturate", "amount": 1.0}, {"op": "occlude", "p": 0.0, "fill": "black"},
                      {"op": "jpeg", "quality": 60}])
    out = chain.run(hr, rng(0))
    assert out.record["steps"][1] == {"op": "occlude", "applied": False}
    np.testing.assert_array_equal(out.image, F.jpeg(F.desaturate(hr, 1.0), 60))
    assert out.encoded == F.jpeg_encode(F.desaturate(hr, 1.0), 60)


def test_p_half_applies_sometimes(hr):
    chain = chain_of([{"op": "noise", "p": 0.5, "sigma": 10}, {"op": "jpeg", "quality": 80}])
    applied = []
    for seed in range(20):
        out = chain.run(hr, rng(seed))
        applied.append(out.record["steps"][0].get("applied", True))
        again = chain.replay(hr, out.record)
        np.testing.assert_array_equal(again.image, out.image)
        assert again.encoded == out.encoded
    assert 3 <= sum(applied) <= 17


def test_skipped_step_after_jpeg_keeps_bytes(hr):
    chain = chain_of([{"op": "jpeg", "quality": 50}, {"op": "noise", "p": 0}])
    out = chain.run(hr, rng(0))
    assert out.encoded == F.jpeg_encode(hr, 50)
    np.testing.assert_array_equal(out.image, F.jpeg_decode(out.encoded))


def test_jpeg_then_more_ops_decodes_and_drops_bytes(hr):
    chain = chain_of([{"op": "jpeg", "quality": 50}, {"op": "desaturate", "amount": 1.0}])
    out = chain.run(hr, rng(0))
    assert out.encoded is None
    np.testing.assert_array_equal(out.image, F.desaturate(F.jpeg(hr, 50), 1.0))


def test_repeat_records_rounds(hr):
    chain = chain_of([{"op": "repeat", "times": 2,
                       "steps": [{"op": "noise", "sigma": [2, 6]}, {"op": "jpeg", "quality": [40, 60]}]}])
    out = chain.run(hr, rng(0))
    (step,) = out.record["steps"]
    assert step["op"] == "repeat"
    assert len(step["rounds"]) == 2
    for rnd in step["rounds"]:
        assert [r["op"] for r in rnd] == ["noise", "jpeg"]
    assert out.encoded is not None and out.encoded[:2] == b"\xff\xd8"
    # the output is the second round applied to the first round's output
    first = F.jpeg(F.gaussian_noise(hr, step["rounds"][0][0]["amount"], False, step["rounds"][0][0]["seed"]),
                   step["rounds"][0][1]["quality"])
    second = F.jpeg_encode(F.gaussian_noise(first, step["rounds"][1][0]["amount"], False,
                                            step["rounds"][1][0]["seed"]), step["rounds"][1][1]["quality"])
    assert out.encoded == second
    again = chain.replay(hr, json.loads(json.dumps(out.record)))
    np.testing.assert_array_equal(again.image, out.image)
    assert again.encoded == out.encoded


def test_follow_record_gives_each_step_the_size_it_ran_on_and_the_final_size(hr):
    from crappify.chain import follow_record

    chain = chain_of([
        {"op": "blur", "kernel_size": 7},
        {"op": "occlude", "count": 1},
        {"op": "resize", "size": "lr"},
        {"op": "jpeg", "p": 0.0},  # skipped: not visited
        {"op": "repeat", "times": 2, "steps": [{"op": "sinc", "kernel_size": 7}, {"op": "occlude", "count": 1}]},
        {"op": "random_order", "steps": [[{"op": "resize", "factor": 0.5}, {"op": "occlude", "count": 1}],
                                         {"op": "jpeg"}]},
    ])
    out = chain.run(hr, rng(3), lr_size=LR)
    seen = []
    final = follow_record(out.record["steps"], HR, lambda rec, at: seen.append((rec["op"], at)))
    assert final == out.size == (LR[0] // 2, LR[1] // 2)
    half = (LR[0] // 2, LR[1] // 2)
    assert [at for op, at in seen if op == "occlude"] == [HR, LR, LR, half]
    assert ("jpeg", HR) not in seen and sum(op == "jpeg" for op, _ in seen) == 1
    assert chain.steps[4].op.keeps_size and not chain.steps[5].op.keeps_size  # nested steps decide
    # a step of unknown effect on the size (an op not registered): unknown from there on
    unknown = follow_record([{"op": "mystery"}, *out.record["steps"][:2]], HR, lambda rec, at: seen.append(at))
    assert unknown is None and seen[-1] is None
    with pytest.raises(ValueError):
        follow_record("not a list", HR)


def test_repeat_times_range_and_yaml(hr):
    chain = chain_of([{"op": "repeat", "times": [1, 3], "steps": [{"op": "desaturate", "p": 0.5}]}])
    counts = {len(chain.run(hr, rng(s)).record["steps"][0]["rounds"]) for s in range(20)}
    assert counts == {1, 2, 3}
    again = Chain.from_dict(yaml.safe_load(chain.to_yaml()))
    assert again.to_dict() == chain.to_dict()
    assert again.to_dict()["steps"][0]["steps"] == [{"op": "desaturate", "p": 0.5}]


# ---------------------------------------------------------------------------------------------------------
# variables and errors


def test_shared_variable(hr):
    chain = chain_of([{"op": "jpeg", "quality": "$q"}, {"op": "text", "text": "$q"}],
                     vars={"q": {"choice": [33]}})
    out = chain.run(hr, rng(0))
    assert out.record["vars"] == {"q": 33}
    assert out.record["steps"][0]["quality"] == 33 and out.record["steps"][1]["text"] == "33"


def test_undefined_variable_raises():
    with pytest.raises(ConfigError, match=r"\$q") as exc:
        chain_of([{"op": "jpeg", "quality": "$q"}])
    assert "vars" in str(exc.value)
    with pytest.raises(ConfigError, match=r"\$s"):
        chain_of([{"op": "repeat", "steps": [{"op": "noise", "sigma": "$s"}]}], vars={"q": 3})


def test_unknown_top_level_key_raises():
    with pytest.raises(ConfigError) as exc:
        Chain.from_dict({"steps": [{"op": "jpeg"}], "stepz": []})
    msg = str(exc.value)
    assert "stepz" in msg
    for key in ("description", "name", "scale", "steps", "vars"):
        assert key in msg


@pytest.mark.parametrize("data, fragment", [
    (None, "mapping"),
    ([{"op": "jpeg"}], "mapping"),
    ({}, "steps"),
    ({"steps": []}, "steps"),
    ({"steps": {"op": "jpeg"}}, "steps"),
    ({"steps": ["jpeg"]}, "steps[0]"),
    ({"steps": [{"quality": 5}]}, "steps[0]"),
    ({"steps": [{"op": "blurr"}]}, "gaussian_blur"),
    ({"steps": [{"op": "jpeg", "p": 1.5}]}, "p must be a probability"),
    ({"steps": [{"op": "jpeg", "p": True}]}, "p must be a probability"),
    ({"steps": [{"op": "jpeg", "p": "often"}]}, "p must be a probability"),
    ({"steps": [{"op": "jpeg"}], "scale": 0}, "scale"),
    ({"steps": [{"op": "jpeg"}], "scale": 2.5}, "scale"),
    ({"steps": [{"op": "jpeg"}], "scale": True}, "scale"),
    ({"steps": [{"op": "jpeg"}], "vars": [1, 2]}, "vars"),
    ({"steps": [{"op": "jpeg"}], "vars": {"q": "$r"}}, "vars.q"),
    ({"steps": [{"op": "repeat"}]}, "repeat.steps"),
    ({"steps": [{"op": "jpeg", "quality": 500}]}, "'quality'"),
])
def test_bad_presets_raise_config_error(data, fragment):
    with pytest.raises(ConfigError) as exc:
        Chain.from_dict(data)
    assert fragment in str(exc.value)


def test_replay_with_mismatched_record_raises(hr):
    out = load_preset("lesson7").run(hr, rng(0))
    with pytest.raises(ConfigError, match="does not match"):
        load_preset("srgan-x4").replay(hr, out.record)


def test_variable_with_invalid_choice_is_rejected(hr):
    with pytest.raises(ConfigError, match="kind"):  # refused when the preset is built
        chain_of([{"op": "noise", "kind": "$k"}], vars={"k": "bogus"}).run(hr, rng(0))


# ---------------------------------------------------------------------------------------------------------
# loading files


def test_load_preset_unknown_name_lists_presets():
    with pytest.raises(ConfigError) as exc:
        load_preset("lesson8")
    msg = str(exc.value)
    assert "lesson8" in msg
    for name in PRESET_NAMES:
        assert name in msg


def test_load_user_yaml(tmp_path, odd):
    path = tmp_path / "mine.yaml"
    path.write_text("description: test\nvars:\n  q: [20, 30]\nsteps:\n"
                    "  - {op: gaussian_blur, sigma: 1.0}\n  - {op: jpeg, quality: $q}\n")
    for arg in (path, str(path)):
        chain = load_preset(arg)
        assert chain.name == "mine" and chain.description == "test"
        out = chain.run(odd, rng(0))
        assert 20 <= out.record["vars"]["q"] <= 30
        assert out.record["steps"][1]["quality"] == out.record["vars"]["q"]
        assert out.image.shape == odd.shape
    named = tmp_path / "other.yml"
    named.write_text(yaml.safe_dump({"name": "fancy", "steps": [{"op": "desaturate"}]}))
    assert load_preset(named).name == "fancy"


def test_load_preset_round_trips_through_a_file(tmp_path, hr):
    chain = load_preset("realistic")
    path = tmp_path / "copy.yaml"
    path.write_text(chain.to_yaml())
    copy = load_preset(path)
    assert copy.to_dict() == chain.to_dict()
    a, b = chain.run(hr, rng(9), lr_size=LR), copy.run(hr, rng(9), lr_size=LR)
    assert a.record == b.record and a.encoded == b.encoded
    np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("text", [
    "steps: [{op: jpeg\n",
    "steps:\n  - {op: jpeg}\n bad indent: [\n",
    "name: x\n\tsteps: []\n",
])
def test_malformed_yaml_gives_config_error(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(path)


@pytest.mark.parametrize("text", ["", "- {op: jpeg}\n", "just a string\n"])
def test_yaml_that_is_not_a_preset_gives_config_error(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_preset(path)


def test_missing_preset_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_preset(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_preset(tmp_path)  # a folder is not a preset file


# ---------------------------------------------------------------------------------------------------------
# trace and leading_size


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_trace_has_one_entry_per_step(name, hr):
    chain = load_preset(name)
    trace: list = []
    out = chain.run(hr, rng(6), lr_size=LR, trace=trace)
    assert len(trace) == len(chain.steps)
    for (label, image), step, rec in zip(trace, chain.steps, out.record["steps"], strict=True):
        assert label.startswith(step.op.name)
        assert ("skipped" in label) == (rec.get("applied") is False)
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
    np.testing.assert_array_equal(trace[-1][1], out.image)
    plain = chain.run(hr, rng(6), lr_size=LR)
    assert plain.record == out.record and plain.encoded == out.encoded
    np.testing.assert_array_equal(plain.image, out.image)


def test_trace_with_skipped_and_repeat(hr):
    chain = chain_of([{"op": "jpeg", "quality": 40}, {"op": "noise", "p": 0},
                      {"op": "repeat", "times": 2, "steps": [{"op": "desaturate"}]}])
    trace: list = []
    chain.run(hr, rng(0), trace=trace)
    assert len(trace) == 3
    assert trace[1][0] == "noise (skipped)"
    np.testing.assert_array_equal(trace[1][1], trace[0][1])
    np.testing.assert_array_equal(trace[0][1], F.jpeg(hr, 40))
    assert trace[0][0] == "jpeg quality=40"


def test_leading_size_lesson7(big):
    chain = load_preset("lesson7")
    assert chain.leading_size(160, 120, None) == (128, 96)
    assert chain.leading_size(120, 160, None) == (96, 128)
    assert chain.leading_size(53, 37, (1, 1)) == (138, 96)  # 53 * 96 / 37 = 137.5
    out = chain.run(big, rng(0))
    first = out.record["steps"][0]
    assert (first["width"], first["height"]) == chain.leading_size(160, 120, None)


def test_leading_size_other_presets():
    assert load_preset("flickr30k-restore").leading_size(64, 48, LR) is None
    assert load_preset("realistic").leading_size(64, 48, LR) is None
    assert load_preset("srgan-x4").leading_size(64, 48, LR) == LR
    assert chain_of([{"op": "resize", "factor": 0.5}]).leading_size(64, 48, None) == (32, 24)
    assert chain_of([{"op": "resize", "size": [40, 60]}]).leading_size(64, 48, None) is None
    assert chain_of([{"op": "resize", "size": 24, "p": 0.9}]).leading_size(64, 48, None) is None
    assert chain_of([{"op": "resize", "size": "$s"}], vars={"s": 24}).leading_size(64, 48, None) is None

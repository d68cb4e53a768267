"""Tests for the op registry, parameter specs, the pure image functions and the degradation ops.

Inputs are real photos from scikit-image, shrunk to small (and odd) sizes so the suite stays fast.
"""

from __future__ import annotations

import itertools
import json
import math

import cv2
import numpy as np
import pytest
import skimage.data

import crappify  # registers every op, `repeat` included
from crappify import OPS
from crappify import functional as F
from crappify.errors import ConfigError, CrappifyError
from crappify.ops import Context
from crappify.registry import Registry
from crappify.spec import Param, Spec, variable_spec

LR_SIZE = (20, 15)  # (width, height) handed to ops through the Context


# ---------------------------------------------------------------------------------------------------------
# inputs


def _photo(name: str, width: int, height: int) -> np.ndarray:
    src = getattr(skimage.data, name)()
    out = cv2.resize(src, (width, height), interpolation=cv2.INTER_AREA)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    return np.ascontiguousarray(out)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {
        "astronaut-64x48": _photo("astronaut", 64, 48),  # landscape, even
        "chelsea-37x53": _photo("chelsea", 37, 53),  # portrait, odd
        "coffee-53x37": _photo("coffee", 53, 37),  # landscape, odd
    }


@pytest.fixture(scope="module")
def astronaut128() -> np.ndarray:
    return _photo("astronaut", 128, 96)


PHOTO_NAMES = ["astronaut-64x48", "chelsea-37x53"]


def make_op(name: str, **params):
    if name == "repeat" and "steps" not in params:
        params["steps"] = [{"op": "jpeg"}]
    if name == "random_order" and "steps" not in params:
        params["steps"] = [{"op": "jpeg"}, {"op": "desaturate"}]
    return OPS.get(name)(**params)


def pixels(image: np.ndarray | None, encoded: bytes | None) -> np.ndarray:
    """The image an op produced, decoding deferred JPEG bytes."""
    if image is None:
        assert isinstance(encoded, bytes) and encoded[:2] == b"\xff\xd8"
        return F.jpeg_decode(encoded)
    return image


def forward(op, img: np.ndarray, seed: int, lr_size=LR_SIZE):
    return op.forward(img, np.random.default_rng(seed), Context(lr_size=lr_size))


# ---------------------------------------------------------------------------------------------------------
# 1. every registered op with its default parameters

ALL_OPS = OPS.names()


def test_registry_holds_the_documented_ops():
    assert set(ALL_OPS) == {"resize", "gaussian_blur", "motion_blur", "noise", "jpeg", "occlude", "text",
                            "color_jitter", "desaturate", "repeat", "blur", "sinc", "random_order"}
    assert crappify.OPS is OPS


@pytest.mark.parametrize("photo", PHOTO_NAMES)
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_output_format_and_input_untouched(name, photo, photos):
    img = photos[photo]
    before = img.copy()
    image, encoded, params = forward(make_op(name), img, seed=3)
    out = pixels(image, encoded)
    np.testing.assert_array_equal(img, before)  # not modified in place
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.min() >= 0 and out.max() <= 255
    expected_hw = (LR_SIZE[1], LR_SIZE[0]) if name == "resize" else img.shape[:2]
    assert out.shape[:2] == expected_hw
    assert not np.shares_memory(out, img)
    assert isinstance(params, dict) and params
    if encoded is not None and image is None:
        assert name in ("jpeg", "repeat", "random_order")


@pytest.mark.parametrize("photo", PHOTO_NAMES)
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_same_seed_same_output(name, photo, photos):
    img = photos[photo]
    op = make_op(name)
    a_img, a_enc, a_params = forward(op, img, seed=11)
    b_img, b_enc, b_params = forward(op, img, seed=11)
    assert a_params == b_params
    assert a_enc == b_enc
    np.testing.assert_array_equal(pixels(a_img, a_enc), pixels(b_img, b_enc))
    # a second instance built from the same parameters behaves the same
    c_img, c_enc, c_params = forward(make_op(name), img, seed=11)
    assert c_params == a_params and c_enc == a_enc
    np.testing.assert_array_equal(pixels(c_img, c_enc), pixels(a_img, a_enc))


@pytest.mark.parametrize("photo", PHOTO_NAMES)
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_replay_reproduces_forward(name, photo, photos):
    img = photos[photo]
    op = make_op(name)
    image, encoded, params = forward(op, img, seed=5)
    r_image, r_encoded = op.replay(img, params)
    assert r_encoded == encoded
    if name == "jpeg":
        assert image is None and r_image is None and isinstance(encoded, bytes)
        np.testing.assert_array_equal(F.jpeg_decode(r_encoded), F.jpeg_decode(encoded))
        np.testing.assert_array_equal(F.jpeg_decode(encoded), op.apply(img, **params))
    np.testing.assert_array_equal(pixels(r_image, r_encoded), pixels(image, encoded))
    # replay on a fresh instance: the record alone is enough
    f_image, f_encoded = make_op(name).replay(img, params)
    assert f_encoded == encoded
    np.testing.assert_array_equal(pixels(f_image, f_encoded), pixels(image, encoded))


@pytest.mark.parametrize("photo", PHOTO_NAMES)
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_params_survive_json(name, photo, photos):
    img = photos[photo]
    op = make_op(name)
    image, encoded, params = forward(op, img, seed=7)
    text = json.dumps(params, allow_nan=False)
    loaded = json.loads(text)
    assert loaded == params
    r_image, r_encoded = op.replay(img, loaded)
    assert r_encoded == encoded
    np.testing.assert_array_equal(pixels(r_image, r_encoded), pixels(image, encoded))


RANDOM_DEFAULT_OPS = [n for n in ALL_OPS if n != "resize"]  # resize to lr_size has nothing to draw


@pytest.mark.parametrize("name", RANDOM_DEFAULT_OPS)
def test_op_different_seeds_give_different_params(name, photos):
    img = photos["astronaut-64x48"]
    op = make_op(name)
    drawn = [json.dumps(forward(op, img, seed=s)[2], sort_keys=True) for s in range(8)]
    assert len(set(drawn)) >= 5, drawn
    outs = {pixels(*forward(op, img, seed=s)[:2]).tobytes() for s in range(4)}
    assert len(outs) >= 2


def test_resize_default_params_are_fixed_by_lr_size(photos):
    img = photos["chelsea-37x53"]
    params = {json.dumps(forward(make_op("resize"), img, seed=s)[2], sort_keys=True) for s in range(5)}
    assert params == {json.dumps({"antialias": True, "height": 15, "interpolation": "bicubic", "width": 20},
                                 sort_keys=True)}


# ---------------------------------------------------------------------------------------------------------
# 2. registry


def test_unknown_op_lists_valid_names():
    with pytest.raises(ConfigError) as exc:
        OPS.get("sharpen")
    msg = str(exc.value)
    assert "sharpen" in msg
    for name in ALL_OPS:
        assert name in msg


def test_config_error_is_user_error_and_value_error():
    assert issubclass(ConfigError, CrappifyError) and issubclass(ConfigError, ValueError)


def test_duplicate_registration_raises():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="duplicate thing name 'a'"):
        reg.register("a")(2)
    assert reg.get("a") == 1 and len(reg) == 1


def test_duplicate_op_registration_raises_and_keeps_original():
    original = OPS.get("jpeg")
    with pytest.raises(ValueError, match="jpeg"):
        OPS.register("jpeg")(object)
    assert OPS.get("jpeg") is original
    assert OPS.names() == ALL_OPS


@pytest.mark.parametrize("photo", PHOTO_NAMES)
@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_declares_whether_it_keeps_the_size_and_says_what_size_it_made(name, photo, photos):
    from crappify.chain import follow_record
    from crappify.ops import Op

    cls = OPS.get(name)
    declared = next(vars(c)["keeps_size"] for c in cls.__mro__ if "keeps_size" in vars(c))
    assert cls is not Op and isinstance(declared, (bool, property)), f"op {name!r} does not declare keeps_size"
    op, img = make_op(name), photos[photo]
    assert isinstance(op.keeps_size, bool)
    image, encoded, params = forward(op, img, seed=7)
    out = pixels(image, encoded)
    size, made = (img.shape[1], img.shape[0]), (out.shape[1], out.shape[0])
    assert op.keeps_size == (made == size)  # resize's default target, LR_SIZE, is no photo's size
    # from the record alone, without running it: the size it made
    assert cls.size_after(size, params) == made
    assert follow_record([{"op": name, **params}], size) == made


def test_an_op_that_does_not_declare_keeps_size_is_refused():
    from crappify.ops import Op, register

    class Undeclared(Op):  # a new op that forgot to say whether it keeps the size
        name = "undeclared"

        def sample(self, img, rng, ctx):
            return {}

        def apply(self, img):
            return img

    with pytest.raises(TypeError, match=r"op 'undeclared' \(Undeclared\) must declare `keeps_size"):
        register("undeclared")(Undeclared)
    assert "undeclared" not in OPS and OPS.names() == ALL_OPS

    class Declared(Undeclared):
        keeps_size = "yes"  # not a bool

    with pytest.raises(TypeError, match="keeps_size"):
        register("undeclared")(Declared)
    assert "undeclared" not in OPS


def test_registry_basics():
    reg: Registry[str] = Registry("colour")
    for name in ("red", "blue", "green"):
        reg.register(name)(name.upper())
    assert reg.names() == ["blue", "green", "red"] == list(reg)
    assert "red" in reg and "pink" not in reg and len(reg) == 3
    with pytest.raises(ConfigError, match="unknown colour 'pink'; valid: blue, green, red"):
        reg.get("pink")


@pytest.mark.parametrize("name, bad, valid", [
    ("jpeg", "qualty", ["quality"]),
    ("gaussian_blur", "radius", ["anisotropic", "max_kernel", "sigma"]),
    ("resize", "scale", ["antialias", "factor", "interpolation", "relative_to", "size", "updown"]),
    ("noise", "std", ["gray_p", "kind", "scale", "sigma"]),
    ("repeat", "count", ["times"]),
])
def test_unknown_param_lists_valid_params(name, bad, valid):
    with pytest.raises(ConfigError) as exc:
        make_op(name, **{bad: 1})
    msg = str(exc.value)
    assert f"unknown parameter(s) {bad} for op {name!r}; valid: " in msg
    assert msg.endswith("valid: " + ", ".join(valid))


def test_a_registry_holds_its_entries_options_one_way():
    reg: Registry = Registry("widget", reserved=("device",))

    @reg.register("declared", options={"a": 1, "b": None})
    def _declared(**kw):
        return kw

    @reg.register("signature")
    def _signature(*, device: str, size: int = 3, mode: str = "x"):
        return size

    assert reg.options("declared") == {"a": 1, "b": None}
    assert reg.options("signature") == {"size": 3, "mode": "x"}  # keyword-only, less the reserved ones
    assert reg.resolve_options("signature", {"mode": "y"}) == {"size": 3, "mode": "y"}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) sise for widget 'signature'; valid: mode, size"):
        reg.resolve_options("signature", {"sise": 4})
    with pytest.raises(ConfigError, match="unknown widget 'nope'"):
        reg.options("nope")
    reg.options("declared")["a"] = 9  # a copy
    assert reg.options("declared")["a"] == 1


# ---------------------------------------------------------------------------------------------------------
# 3. parameter specs

INT_P = Param("int", 50, lo=1, hi=100)
FLOAT_P = Param("float", 1.0, lo=0.0, hi=5.0)
STR_P = Param("str", "a", choices=("a", "b", "c"))


def draws(spec: Spec, n: int, seed: int = 0, variables=None) -> list:
    rng = np.random.default_rng(seed)
    return [spec.draw(rng, variables or {}) for _ in range(n)]


def test_fixed_value():
    spec = Spec("p", INT_P, 42)
    assert spec.mode == "fixed" and spec.var is None
    assert draws(spec, 20) == [42] * 20
    assert Spec("p", FLOAT_P, 2).draw(np.random.default_rng(0), {}) == 2.0
    assert isinstance(Spec("p", FLOAT_P, 2).draw(np.random.default_rng(0), {}), float)
    assert Spec("p", Param("bool", True), False).draw(np.random.default_rng(0), {}) is False
    assert Spec("p", Param("color", [1, 2, 3]), [4, 5, 6]).draw(np.random.default_rng(0), {}) == [4, 5, 6]
    assert Spec("p", Param("int", None, nullable=True), None).draw(np.random.default_rng(0), {}) is None


def test_fixed_value_uses_no_randomness():
    rng = np.random.default_rng(9)
    Spec("p", INT_P, 42).draw(rng, {})
    assert rng.integers(1 << 30) == np.random.default_rng(9).integers(1 << 30)


def test_int_range_is_inclusive():
    spec = Spec("p", INT_P, [3, 7])
    assert spec.mode == "range"
    values = draws(spec, 2000)
    assert all(type(v) is int for v in values)
    assert min(values) == 3 and max(values) == 7
    assert set(values) == {3, 4, 5, 6, 7}


def test_int_range_at_param_bounds():
    values = draws(Spec("p", INT_P, [1, 100]), 5000)
    assert min(values) == 1 and max(values) == 100


def test_degenerate_range():
    assert set(draws(Spec("p", INT_P, [9, 9]), 50)) == {9}


def test_float_range():
    values = draws(Spec("p", FLOAT_P, [0.5, 1.5]), 2000)
    assert all(type(v) is float for v in values)
    assert all(0.5 <= v <= 1.5 for v in values)
    assert min(values) < 0.55 and max(values) > 1.45
    assert len(set(values)) > 1900
    assert all(type(v) is float for v in draws(Spec("p", FLOAT_P, [1, 3]), 10))  # ints written, floats drawn


def test_list_of_strings_is_a_choice():
    spec = Spec("p", STR_P, ["a", "c"])
    assert spec.mode == "choice"
    values = draws(spec, 200)
    assert set(values) == {"a", "c"}


def test_choice_mapping():
    values = draws(Spec("p", INT_P, {"choice": [10, 20, 40]}), 300)
    assert set(values) == {10, 20, 40} and all(type(v) is int for v in values)
    assert set(draws(Spec("p", STR_P, {"choice": ["b"]}), 10)) == {"b"}
    assert set(draws(Spec("p", FLOAT_P, {"choice": [0.5, 2]}), 100)) == {0.5, 2.0}


def test_draws_depend_only_on_the_generator():
    spec = Spec("p", FLOAT_P, [0.0, 5.0])
    assert draws(spec, 50, seed=4) == draws(spec, 50, seed=4)
    assert draws(spec, 50, seed=4) != draws(spec, 50, seed=5)


def test_variable_reference():
    spec = Spec("p", INT_P, "$q")
    assert spec.mode == "var" and spec.var == "q"
    assert spec.draw(np.random.default_rng(0), {"q": 37}) == 37
    assert Spec("p", Param("str", "x"), "$q").draw(np.random.default_rng(0), {"q": 37}) == "37"
    assert Spec("p", FLOAT_P, "$q").draw(np.random.default_rng(0), {"q": 2}) == 2.0
    with pytest.raises(ConfigError, match="must lie in"):  # the variable's value is still validated
        spec.draw(np.random.default_rng(0), {"q": 500})


def test_variable_reference_must_be_an_identifier():
    with pytest.raises(ConfigError, match=r"\$name"):
        Spec("op 'jpeg', parameter 'quality'", INT_P, "$1q")


@pytest.mark.parametrize("param, raw, why", [
    (INT_P, 0, "must lie in"),
    (INT_P, 101, "must lie in"),
    (INT_P, [0, 50], "must lie in"),
    (INT_P, [50, 101], "must lie in"),
    (FLOAT_P, -0.1, "must lie in"),
    (INT_P, [70, 10], "low <= high"),
    (FLOAT_P, [2.0, 1.0], "low <= high"),
    (INT_P, "high", "expected an integer"),
    (INT_P, 3.5, "expected an integer"),
    (INT_P, [1.5, 3], "expected an integer"),
    (INT_P, True, "expected an integer"),
    (FLOAT_P, "x", "expected a number"),
    (Param("bool", True), "yes", "expected true or false"),
    (Param("bool", True), 1, "expected true or false"),
    (STR_P, 3, "expected a name"),
    (STR_P, "d", "expected one of a, b, c"),
    (STR_P, ["a", "d"], "expected one of a, b, c"),
    (STR_P, {"choice": ["a", "z"]}, "expected one of a, b, c"),
    (INT_P, [1, 2, 3], "a list must be"),
    (INT_P, [], "a list must be"),
    (INT_P, {"pick": [1, 2]}, "mapping must be"),
    (INT_P, {"choice": []}, "mapping must be"),
    (INT_P, None, "a value is required"),
    (Param("color", [0, 0, 0]), [0, 0, 256], "colour"),
    (Param("color", [0, 0, 0]), [0, 0], "colour"),
])
def test_bad_values_raise_config_error_naming_the_param(param, raw, why):
    where = "op 'demo', parameter 'knob'"
    with pytest.raises(ConfigError) as exc:
        Spec(where, param, raw)
    msg = str(exc.value)
    assert where in msg and why in msg


@pytest.mark.parametrize("name, params, key", [
    ("jpeg", {"quality": 0}, "quality"),
    ("jpeg", {"quality": [70, 10]}, "quality"),
    ("jpeg", {"quality": "best"}, "quality"),
    ("resize", {"interpolation": "cubic"}, "interpolation"),
    ("resize", {"size": 0}, "size"),
    ("occlude", {"fill": ["black", "white"]}, "fill"),
    ("gaussian_blur", {"sigma": [0.0, 3.0]}, "sigma"),
    ("text", {"color": "red"}, "color"),
    ("noise", {"kind": "salt"}, "kind"),
    ("repeat", {"times": 11}, "times"),
])
def test_op_bad_params_name_the_parameter(name, params, key):
    with pytest.raises(ConfigError) as exc:
        make_op(name, **params)
    assert f"'{key}'" in str(exc.value) and f"'{name}'" in str(exc.value)


def test_variable_spec_kinds():
    rng = np.random.default_rng(0)
    assert {variable_spec("q", [10, 70]).draw(rng, {}) for _ in range(500)} == set(range(10, 71))
    f = variable_spec("s", [0.5, 2])
    assert f.param.kind == "float" and all(0.5 <= f.draw(rng, {}) <= 2 for _ in range(50))
    assert variable_spec("k", ["gaussian", "poisson"]).param.kind == "str"
    assert variable_spec("b", True).draw(rng, {}) is True
    assert variable_spec("c", {"choice": [1, 2]}).param.kind == "int"
    with pytest.raises(ConfigError, match=r"vars\.x: a variable cannot refer to another variable"):
        variable_spec("x", "$y")
    with pytest.raises(ConfigError, match=r"vars\.r"):
        variable_spec("r", [9, 1])


def test_variable_value_for_str_param_is_checked_against_choices():
    param = Param("str", "gaussian", choices=("gaussian", "poisson"))
    spec = Spec("op 'noise', parameter 'kind'", param, "$k")
    with pytest.raises(ConfigError, match="kind"):
        spec.draw(np.random.default_rng(0), {"k": "bogus"})


def test_nan_is_rejected_by_bounds():
    with pytest.raises(ConfigError):
        Spec("op 'gaussian_blur', parameter 'sigma'", Param("float", 1.0, lo=0.05, hi=20.0), float("nan"))


# ---------------------------------------------------------------------------------------------------------
# 4. pure image functions


@pytest.mark.parametrize("interpolation", F.INTERPOLATIONS)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", [(20, 15), (31, 23), (101, 77), (37, 53), (64, 24)])
def test_resize_exact_size(interpolation, antialias, size, photos):
    img = photos["astronaut-64x48"]
    out = F.resize(img, *size, interpolation=interpolation, antialias=antialias)
    assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8


def test_resize_unknown_interpolation():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown interpolation"):
        F.resize(img, 4, 4, "cubic")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos"])
def test_resize_antialias_reduces_aliasing(interpolation):
    src = _photo("astronaut", 128, 128)
    hf = src.copy()
    hf[:, ::2] = 255 - hf[:, ::2]  # a photo modulated by a Nyquist-rate checkerboard
    hf[::2] = 255 - hf[::2]
    ref = cv2.resize(hf, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
    aa = F.resize(hf, 32, 32, interpolation, antialias=True).astype(np.float64)
    no_aa = F.resize(hf, 32, 32, interpolation, antialias=False).astype(np.float64)
    assert not np.array_equal(aa, no_aa)
    err_aa, err_no = np.abs(aa - ref).mean(), np.abs(no_aa - ref).mean()
    assert err_aa < 0.6 * err_no, (err_aa, err_no)


def test_resize_enlarging_ignores_antialias(photos):
    img = photos["chelsea-37x53"]
    np.testing.assert_array_equal(F.resize(img, 74, 106, "bicubic", True),
                                  F.resize(img, 74, 106, "bicubic", False))


def test_gaussian_blur_isotropic_reduces_variance(photos):
    img = photos["astronaut-64x48"]
    v0 = img.astype(np.float64).var()
    v1 = F.gaussian_blur(img, 1.0).astype(np.float64).var()
    v3 = F.gaussian_blur(img, 3.0).astype(np.float64).var()
    assert v3 < v1 < v0
    assert _grad(F.gaussian_blur(img, 3.0), axis=1) < 0.5 * _grad(img, axis=1)
    assert abs(F.gaussian_blur(img, 2.0).mean() - img.mean()) < 1.5


def _grad(a: np.ndarray, axis: int) -> float:
    return float(np.abs(np.diff(a.astype(np.float64), axis=axis)).mean())


@pytest.fixture(scope="module")
def noise_img() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_gaussian_blur_anisotropic_axis(noise_img):
    out = F.gaussian_blur(noise_img, sigma_x=4.0, sigma_y=0.5, angle=0.0)
    # blurred along x: neighbours along x are alike, neighbours along y much less so
    assert _grad(out, axis=1) < 0.3 * _grad(out, axis=0)
    rot = F.gaussian_blur(noise_img, sigma_x=4.0, sigma_y=0.5, angle=90.0)
    assert _grad(rot, axis=0) < 0.3 * _grad(rot, axis=1)


def test_gaussian_kernel_normalised_and_oriented():
    k = F.gaussian_kernel(3.0, 0.5, 0.0, 15)
    assert k.shape == (15, 15) and math.isclose(float(k.sum()), 1.0, rel_tol=1e-5)
    assert k[7].sum() > 0.7 and k[:, 7].sum() < 0.3  # the mass lies along the middle row (the x axis)
    k90 = F.gaussian_kernel(3.0, 0.5, 90.0, 15)
    assert k90[:, 7].sum() > 0.7 and k90[7].sum() < 0.3


def test_kernel_size_for():
    assert F.kernel_size_for(1.0) == 7
    assert F.kernel_size_for(0.1) == 3
    assert F.kernel_size_for(10.0) == 21
    assert F.kernel_size_for(10.0, 31) == 31
    for sigma in (0.2, 0.7, 1.3, 2.9):
        assert F.kernel_size_for(sigma) % 2 == 1


def test_kernel_size_for_respects_even_cap():
    assert F.kernel_size_for(10.0, 20) <= 20


def test_motion_blur_preserves_mean_and_blurs_along_angle(photos, noise_img):
    img = photos["astronaut-64x48"]
    for angle in (0.0, 33.0, 90.0):
        out = F.motion_blur(img, 9, angle)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert abs(out.astype(np.float64).mean() - img.astype(np.float64).mean()) < 1.5
    horiz = F.motion_blur(noise_img, 9, 0.0)
    assert _grad(horiz, axis=1) < 0.5 * _grad(horiz, axis=0)
    vert = F.motion_blur(noise_img, 9, 90.0)
    assert _grad(vert, axis=0) < 0.5 * _grad(vert, axis=1)


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.full((96, 96, 3), 128, np.uint8)


@pytest.mark.parametrize("sigma", [3.0, 10.0, 20.0])
def test_gaussian_noise_std(sigma, grey):
    out = F.gaussian_noise(grey, sigma, gray=False, seed=1)
    residual = out.astype(np.float64) - grey
    assert abs(residual.std() - sigma) < 0.1 * sigma
    assert abs(residual.mean()) < 0.1 * sigma
    assert not np.array_equal(out[..., 0], out[..., 1])


def test_gaussian_noise_seeded(photos):
    img = photos["chelsea-37x53"]
    a = F.gaussian_noise(img, 10.0, False, seed=1)
    np.testing.assert_array_equal(a, F.gaussian_noise(img, 10.0, False, seed=1))
    assert not np.array_equal(a, F.gaussian_noise(img, 10.0, False, seed=2))


def test_gray_noise_identical_across_channels(grey):
    outs = (F.gaussian_noise(grey, 10.0, gray=True, seed=3), F.poisson_noise(grey, 2.0, gray=True, seed=3))
    for out in outs:
        assert not np.array_equal(out, grey)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
    colour = F.poisson_noise(grey, 2.0, gray=False, seed=3)
    assert not np.array_equal(colour[..., 0], colour[..., 1])


def test_gray_noise_on_colour_photo_adds_same_noise_to_each_channel(photos):
    img = photos["astronaut-64x48"]
    out = F.gaussian_noise(img, 5.0, gray=True, seed=4)
    residual = out.astype(np.int16) - img
    unclipped = ((img > 20) & (img < 235)).all(axis=2)
    assert unclipped.sum() > 500
    np.testing.assert_array_equal(residual[unclipped, 0], residual[unclipped, 1])
    np.testing.assert_array_equal(residual[unclipped, 0], residual[unclipped, 2])


def test_poisson_noise_grows_with_scale(photos):
    img = photos["astronaut-64x48"]
    scales = (0.25, 0.5, 1, 2, 4)
    stds = [(F.poisson_noise(img, s, False, seed=0).astype(np.float64) - img).std() for s in scales]
    assert all(a < b for a, b in itertools.pairwise(stds)), stds
    assert stds[0] > 0


def test_jpeg_quality_tradeoff(astronaut128):
    img = astronaut128
    errors, sizes = [], []
    for q in (10, 40, 90):
        data = F.jpeg_encode(img, q)
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
        dec = F.jpeg_decode(data)
        assert dec.shape == img.shape and dec.dtype == np.uint8
        np.testing.assert_array_equal(F.jpeg(img, q), dec)
        errors.append(np.abs(dec.astype(np.float64) - img).mean())
        sizes.append(len(data))
    assert errors[0] > errors[1] > errors[2]
    assert sizes[0] < sizes[1] < sizes[2]


def test_jpeg_keeps_colours_in_rgb_order():
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = 220  # strongly red
    dec = F.jpeg(img, 95)
    assert dec[..., 0].mean() > 200 and dec[..., 2].mean() < 30


def test_occlude_black(photos):
    img = photos["chelsea-37x53"]
    before = img.copy()
    out = F.occlude(img, [[5, 7, 10, 12]], "black", seed=0)
    np.testing.assert_array_equal(img, before)
    assert (out[7:19, 5:15] == 0).all()
    mask = np.ones(img.shape[:2], bool)
    mask[7:19, 5:15] = False
    np.testing.assert_array_equal(out[mask], img[mask])


def test_occlude_mean_and_noise(photos):
    img = photos["astronaut-64x48"]
    mean = img.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    out = F.occlude(img, [[0, 0, 8, 8], [50, 40, 14, 8]], "mean", seed=0)
    assert (out[0:8, 0:8] == mean).all() and (out[40:48, 50:64] == mean).all()
    a = F.occlude(img, [[10, 10, 20, 20]], "noise", seed=1)
    np.testing.assert_array_equal(a, F.occlude(img, [[10, 10, 20, 20]], "noise", seed=1))
    assert not np.array_equal(a, F.occlude(img, [[10, 10, 20, 20]], "noise", seed=2))
    assert a[10:30, 10:30].std() > 50  # uniform noise
    with pytest.raises(ValueError, match="unknown fill"):
        F.occlude(img, [[0, 0, 1, 1]], "white", seed=0)


def test_text_changes_pixels_only_near_position(photos):
    img = photos["astronaut-64x48"]
    x, y, scale = 12, 30, 0.4
    out = F.text(img, "42", x, y, scale, (255, 255, 0))
    changed = np.argwhere((out != img).any(axis=2))
    assert len(changed) > 10
    tw, th = F.text_size("42", scale)
    ys, xs = changed[:, 0], changed[:, 1]
    assert xs.min() >= x - 2 and xs.max() <= x + tw + 2
    assert ys.min() >= y - th - 2 and ys.max() <= y + 3
    # moving the origin moves the ink
    moved = np.argwhere((F.text(img, "42", x + 20, y - 10, scale, (255, 255, 0)) != img).any(axis=2))
    assert moved[:, 1].min() >= x + 18 and moved[:, 0].max() <= y - 7


def test_color_jitter_identity_and_effect(photos):
    img = photos["chelsea-37x53"]
    same = F.color_jitter(img, 1.0, 1.0, 1.0, 0.0)
    np.testing.assert_array_equal(same, img)
    assert same is not img
    darker = F.color_jitter(img, 0.5, 1.0, 1.0, 0.0)
    assert darker.astype(np.float64).mean() < 0.6 * img.astype(np.float64).mean()
    flat = F.color_jitter(img, 1.0, 0.2, 1.0, 0.0)
    assert flat.astype(np.float64).std() < 0.4 * img.astype(np.float64).std()
    hue = F.color_jitter(img, 1.0, 1.0, 1.0, 0.25)
    assert not np.array_equal(hue, img)


def test_desaturate(photos):
    img = photos["astronaut-64x48"]
    grey_img = F.desaturate(img, 1.0).astype(np.int16)
    assert np.abs(grey_img[..., 0] - grey_img[..., 1]).max() <= 1
    assert np.abs(grey_img[..., 1] - grey_img[..., 2]).max() <= 1
    keep = F.desaturate(img, 0.0)
    np.testing.assert_array_equal(keep, img)
    assert keep is not img
    half = F.desaturate(img, 0.5).astype(np.int16)
    def spread(a: np.ndarray) -> float:
        return float(np.abs(a[..., 0].astype(np.int16) - a[..., 2]).mean())

    assert 0 < spread(half) < spread(img)


def test_resize_to_same_size_returns_a_new_array(photos):
    img = photos["astronaut-64x48"]
    out = F.resize(img, 64, 48)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, img)


# ---------------------------------------------------------------------------------------------------------
# 5. the resize op


def test_resize_to_lr_size(photos):
    img = photos["chelsea-37x53"]
    for op in (make_op("resize"), make_op("resize", size="lr"), make_op("resize", size="lr", factor=None)):
        image, _, params = forward(op, img, seed=0, lr_size=(9, 13))
        assert image.shape == (13, 9, 3)
        assert (params["width"], params["height"]) == (9, 13)
    assert make_op("resize", size="lr").to_dict() == {"size": "lr"}


def test_resize_to_lr_without_lr_size_raises(photos):
    with pytest.raises(ConfigError, match="lr"):
        forward(make_op("resize"), photos["chelsea-37x53"], seed=0, lr_size=None)


@pytest.mark.parametrize("w, h", [(160, 120), (120, 160), (37, 53), (53, 37), (200, 96)])
def test_resize_short_side(w, h):
    img = _photo("coffee", w, h)
    image, _, params = forward(make_op("resize", size=96), img, seed=0, lr_size=None)
    oh, ow = image.shape[:2]
    assert min(ow, oh) == 96
    long_in, short_in, long_out = max(w, h), min(w, h), max(ow, oh)
    assert abs(long_out - long_in * 96 / short_in) <= 0.5 + 1e-9  # aspect kept to the nearest pixel
    assert (ow > oh) == (w > h)
    assert (params["width"], params["height"]) == (ow, oh)


def test_resize_factor(photos):
    img = photos["astronaut-64x48"]
    image, _, _ = forward(make_op("resize", factor=0.5), img, seed=0, lr_size=None)
    assert image.shape == (24, 32, 3)
    image, _, _ = forward(make_op("resize", factor=2), img, seed=0, lr_size=None)
    assert image.shape == (96, 128, 3)
    odd, _, _ = forward(make_op("resize", factor=0.5), photos["chelsea-37x53"], seed=0, lr_size=None)
    assert abs(odd.shape[1] - 18.5) <= 0.5 and abs(odd.shape[0] - 26.5) <= 0.5


def test_resize_factor_range_is_drawn(photos):
    img = photos["astronaut-64x48"]
    op = make_op("resize", factor=[0.25, 1.0], interpolation=["area", "nearest"])
    widths, interps = set(), set()
    for s in range(20):
        _, _, params = forward(op, img, seed=s, lr_size=None)
        widths.add(params["width"])
        interps.add(params["interpolation"])
        assert 16 <= params["width"] <= 64
    assert len(widths) > 5 and interps == {"area", "nearest"}


def test_resize_size_and_factor_together_raise():
    with pytest.raises(ConfigError, match="either size or factor"):
        make_op("resize", size=96, factor=0.5)
    with pytest.raises(ConfigError, match="either size or factor"):
        make_op("resize", size="lr", factor=0.5)


def test_resize_target_without_rng():
    ctx = Context(lr_size=(10, 20))
    assert make_op("resize").target(64, 48, None, ctx) == (10, 20)
    assert make_op("resize", size=24).target(64, 48, None, ctx) == (32, 24)
    assert make_op("resize", factor=0.25).target(64, 48, None, ctx) == (16, 12)
    assert make_op("resize", size=[20, 30]).target(64, 48, None, ctx) is None


def test_resize_size_null_is_lr_or_config_error(photos):
    try:
        op = make_op("resize", size=None)
    except ConfigError:
        return
    image, _, _ = forward(op, photos["chelsea-37x53"], seed=0, lr_size=(9, 13))
    assert image.shape == (13, 9, 3)


# ---------------------------------------------------------------------------------------------------------
# other ops with explicit parameters


def test_gaussian_blur_op_anisotropic_records_two_sigmas(photos):
    img = photos["astronaut-64x48"]
    op = make_op("gaussian_blur", sigma=[0.5, 3.0], anisotropic=1.0)
    for s in range(5):
        _, _, p = forward(op, img, seed=s)
        assert p["sigma_x"] != p["sigma_y"] and 0.0 <= p["angle"] < 180.0
        assert p["kernel_size"] % 2 == 1 and p["kernel_size"] <= 21
    _, _, p = forward(make_op("gaussian_blur", sigma=1.0), img, seed=0)
    assert p == {"sigma_x": 1.0, "sigma_y": 1.0, "angle": 0.0, "kernel_size": 7}


def test_motion_blur_op_length_is_odd(photos):
    op = make_op("motion_blur", length=[4, 10])
    for s in range(10):
        _, _, p = forward(op, photos["chelsea-37x53"], seed=s)
        assert p["length"] % 2 == 1 and 5 <= p["length"] <= 11


def test_noise_op_kinds(photos):
    img = photos["astronaut-64x48"]
    _, _, p = forward(make_op("noise", kind="poisson", scale=1.5), img, seed=0)
    assert p["kind"] == "poisson" and p["amount"] == 1.5 and p["gray"] is False
    _, _, p = forward(make_op("noise", sigma=4, gray_p=1.0), img, seed=0)
    assert p["kind"] == "gaussian" and p["amount"] == 4.0 and p["gray"] is True
    out, _, _ = forward(make_op("noise", kind="gaussian", sigma=0), img, seed=0)
    np.testing.assert_array_equal(out, img)


def test_occlude_op_rects_inside_image(photos):
    img = photos["chelsea-37x53"]
    op = make_op("occlude", count=[2, 4], size=[0.1, 0.5], fill="black")
    for s in range(10):
        out, _, p = forward(op, img, seed=s)
        assert 2 <= len(p["rects"]) <= 4
        for x, y, w, h in p["rects"]:
            assert x >= 0 and y >= 0 and x + w <= 37 and y + h <= 53 and w >= 1 and h >= 1
            assert (out[y:y + h, x:x + w] == 0).all()


def test_text_op_draws_inside_region(photos):
    img = photos["astronaut-64x48"]
    op = make_op("text", text=["7", "9"], region=0.25)
    seen = set()
    for s in range(10):
        out, _, p = forward(op, img, seed=s)
        seen.add(p["text"])
        assert 0 <= p["x"] <= 16 and p["y"] >= F.text_size(p["text"], 0.35)[1]
        assert p["color"] == [255, 255, 255]
        assert not np.array_equal(out, img)
    assert seen == {"7", "9"}


def test_repeat_op_records_rounds(photos):
    img = photos["astronaut-64x48"]
    op = make_op("repeat", times=3, steps=[{"op": "noise", "sigma": 3}, {"op": "jpeg", "quality": 50}])
    image, encoded, p = forward(op, img, seed=0)
    assert image is None and encoded[:2] == b"\xff\xd8"
    assert len(p["rounds"]) == 3
    assert [[r["op"] for r in rnd] for rnd in p["rounds"]] == [["noise", "jpeg"]] * 3
    assert len({rnd[0]["seed"] for rnd in p["rounds"]}) == 3
    np.testing.assert_array_equal(op.apply(img, **p), F.jpeg_decode(encoded))


def test_a_parameter_declaration_with_an_unknown_kind_is_refused():
    from crappify.spec import KINDS, Param

    for kind in KINDS:
        Param(kind, None, nullable=True)
    with pytest.raises(ValueError, match="parameter kind must be one of int, float, str, bool, color, not 'flaot'"):
        Param("flaot", 1.0)

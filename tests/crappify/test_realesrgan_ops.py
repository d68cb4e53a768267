"""Tests for what Real-ESRGAN's degradation model adds: its blur kernels (`blur`, `sinc`), the
up/down/keep `resize`, the `random_order` meta-op, `usm_sharpen` and the `realesrgan` preset.
"""

from __future__ import annotations

import collections
import json
import math

import cv2
import numpy as np
import pytest
import scipy.special
import skimage.data

import crappify  # noqa: F401  (registers every op)
from crappify import OPS
from crappify import functional as F
from crappify.chain import Chain, load_preset
from crappify.errors import ConfigError
from crappify.ops import Context


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(cv2.resize(skimage.data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA))


def _kernel(kind: str, size: int = 11) -> np.ndarray:
    return F.blur_kernel(kind, size, sigma_x=2.0, sigma_y=0.8, angle=30.0, beta=1.3, omega_c=1.2)


# ---------------------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("kind", [*F.BLUR_KERNELS, "sinc"])
def test_kernels_are_normalised_odd_and_symmetric(kind):
    k = _kernel(kind)
    assert k.shape == (11, 11) and k.dtype == np.float32
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # every kernel is point-symmetric
    if kind == "aniso" or kind.endswith("_aniso"):
        assert not np.allclose(k, k.T, atol=1e-4)  # rotated ellipse: not mirror-symmetric
    else:
        np.testing.assert_allclose(k, k.T, atol=1e-7)
        np.testing.assert_allclose(k, k[::-1, :], atol=1e-7)
    if kind != "sinc":
        assert k.min() > 0 and k.argmax() == k.size // 2


def test_generalized_gaussian_with_beta_2_is_the_gaussian():
    for sx, sy, angle in [(1.0, 1.0, 0.0), (2.5, 0.7, 37.0), (0.4, 3.0, 120.0)]:
        np.testing.assert_allclose(F.generalized_gaussian_kernel(sx, sy, angle, 2.0, 15),
                                   F.gaussian_kernel(sx, sy, angle, 15), atol=1e-7)


def test_generalized_gaussian_and_plateau_3x3_by_hand():
    e1, e2 = math.exp(-0.5), math.exp(-0.5 * math.sqrt(2))  # beta 1: exp(-d/2), d = 1 (edge), sqrt 2 (corner)
    gg = np.array([[e2, e1, e2], [e1, 1, e1], [e2, e1, e2]])
    np.testing.assert_allclose(F.generalized_gaussian_kernel(1, 1, 0, 1.0, 3), gg / gg.sum(), rtol=1e-6)
    # plateau, beta 2, sigma_x 2 (x is the column): 1/(1 + x²/4 + y²)
    pl = np.array([[1 / 2.25, 1 / 2, 1 / 2.25], [1 / 1.25, 1, 1 / 1.25], [1 / 2.25, 1 / 2, 1 / 2.25]])
    np.testing.assert_allclose(F.plateau_kernel(2, 1, 0, 2.0, 3), pl / pl.sum(), rtol=1e-6)
    np.testing.assert_allclose(F.plateau_kernel(2, 1, 90, 2.0, 3), (pl / pl.sum()).T, rtol=1e-6)


def test_kernels_match_basicsr_quadratic_form_with_half_beta():
    """BasicSR writes exp(-½ (gᵀΣ⁻¹g)^b) and 1/(1 + (gᵀΣ⁻¹g)^b) with Σ = U diag(σx², σy²) Uᵀ: our β = 2b."""
    sx, sy, theta, b, size = 2.2, 0.9, 0.6, 0.7, 9
    u = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(u @ np.diag([sx ** 2, sy ** 2]) @ u.T)
    ax = np.arange(size) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    grid = np.stack([xx, yy], -1).astype(np.float64)
    q = np.einsum("...i,ij,...j->...", grid, inv, grid)
    gg, pl = np.exp(-0.5 * q ** b), 1 / (1 + q ** b)
    angle = math.degrees(theta)
    np.testing.assert_allclose(F.generalized_gaussian_kernel(sx, sy, angle, 2 * b, size), gg / gg.sum(), atol=1e-7)
    np.testing.assert_allclose(F.plateau_kernel(sx, sy, angle, 2 * b, size), pl / pl.sum(), atol=1e-7)


def test_bessel_j1_matches_scipy():
    x = np.linspace(0, 50, 2001)
    np.testing.assert_allclose(F.bessel_j1(x), scipy.special.j1(x), atol=1e-12)


def test_sinc_kernel_3x3_by_hand():
    w = 2.0
    edge = w * scipy.special.j1(w) / (2 * math.pi)
    corner = w * scipy.special.j1(w * math.sqrt(2)) / (2 * math.pi * math.sqrt(2))
    k = np.array([[corner, edge, corner], [edge, w * w / (4 * math.pi), edge], [corner, edge, corner]])
    np.testing.assert_allclose(F.sinc_kernel(w, 3), k / k.sum(), rtol=1e-6)


@pytest.mark.parametrize("omega_c, size", [(math.pi / 3, 21), (math.pi / 2, 13), (math.pi / 3, 7)])
def test_sinc_kernel_is_low_pass(omega_c, size):
    h = np.abs(np.fft.fft2(F.sinc_kernel(omega_c, size).astype(np.float64), (128, 128)))
    w = np.fft.fftfreq(128) * 2 * np.pi
    radius = np.hypot(*np.meshgrid(w, w))
    assert h[0, 0] == pytest.approx(1.0, abs=1e-6)  # DC gain 1
    assert h[radius < omega_c / 2].min() > 0.7  # passes inside the cutoff (a truncated kernel ripples)
    assert h[radius > (omega_c + np.pi) / 2 + 0.3].max() < 0.25  # attenuates toward Nyquist
    assert h[0, 64] < 0.1  # Nyquist on an axis


def test_blur_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid: iso, aniso"):
        F.blur_kernel("box", 5)


# ---------------------------------------------------------------------------------------------------------
# ops


def _sample(op, n: int, img=None, lr_size=(4, 4)):
    img = np.zeros((8, 8, 3), np.uint8) if img is None else img
    return [op.sample(img, np.random.default_rng(s), Context(lr_size=lr_size)) for s in range(n)]


def test_blur_draws_kernels_by_weight_and_records_plain_params(photo):
    op = OPS.get("blur")(sinc_p=0.1)
    draws = _sample(op, 3000)
    counts = collections.Counter(d["kernel"] for d in draws)
    assert counts["sinc"] / 3000 == pytest.approx(0.1, abs=0.03)
    for kind, w in op.DEFAULT_KERNELS.items():
        assert counts[kind] / 3000 == pytest.approx(0.9 * w, abs=0.03), kind
    assert {d["size"] for d in draws} == set(range(7, 22, 2))
    for d in draws[:50]:
        assert json.loads(json.dumps(d)) == d and all(not isinstance(v, (list, np.ndarray)) for v in d.values())
        if d["kernel"] == "sinc":
            lo = math.pi / 3 if d["size"] < 13 else math.pi / 5
            assert lo <= d["omega_c"] <= math.pi
        if d["kernel"].startswith("generalized"):
            assert 1.0 <= d["beta"] <= 8.0
    image, encoded, params = op.forward(photo, np.random.default_rng(4), Context())
    replayed, _ = OPS.get("blur")(sinc_p=0.1).replay(photo, json.loads(json.dumps(params)))
    assert encoded is None and replayed.tobytes() == image.tobytes()


def test_blur_beta_splits_at_the_gaussian_like_basicsr():
    betas = [d["beta"] for d in _sample(OPS.get("blur")(kernels={"generalized_iso": 1}, betag=[1.0, 8.0]), 800)]
    below = sum(b < 2 for b in betas) / len(betas)
    assert below == pytest.approx(0.5, abs=0.07) and min(betas) >= 1 and max(betas) <= 8


def test_blur_with_one_kernel_type_and_fixed_values(photo):
    op = OPS.get("blur")(kernels=["plateau_aniso"], kernel_size=9, sigma=1.5, betap=3.0)
    d = _sample(op, 1)[0]
    assert d["kernel"] == "plateau_aniso" and d["size"] == 9 and d["sigma_x"] == d["sigma_y"] == 1.5
    assert d["beta"] == 3.0
    expected = cv2.filter2D(photo, -1, F.plateau_kernel(1.5, 1.5, d["angle"], 3.0, 9),
                            borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_array_equal(op.apply(photo, **d), expected)


def test_sinc_op_draws_cutoff_and_odd_size(photo):
    draws = _sample(OPS.get("sinc")(), 400)
    assert all(math.pi / 3 <= d["omega_c"] <= math.pi for d in draws)
    assert {d["size"] for d in draws} == set(range(7, 22, 2))
    op = OPS.get("sinc")(omega_c=1.0, kernel_size=8)
    d = _sample(op, 1)[0]
    assert d == {"omega_c": 1.0, "size": 9}
    out = op.apply(photo, **d)
    assert out.shape == photo.shape and out.std() < photo.std()  # low-pass


def test_resize_updown_and_relative_to_lr():
    op = OPS.get("resize")(factor=[0.15, 1.5], updown={"up": 0.2, "down": 0.7, "keep": 0.1})
    sizes = [d["width"] for d in _sample(op, 2000, img=np.zeros((100, 100, 3), np.uint8))]
    assert sum(s > 100 for s in sizes) / 2000 == pytest.approx(0.2, abs=0.04)
    assert sum(s == 100 for s in sizes) / 2000 == pytest.approx(0.1, abs=0.04)  # keep (+ rare up/down near 1)
    assert min(sizes) >= 15 and max(sizes) <= 150
    keep = OPS.get("resize")(factor=[0.5, 2.0], updown={"keep": 1})
    assert {(d["width"], d["height"]) for d in _sample(keep, 5, img=np.zeros((30, 40, 3), np.uint8))} == {(40, 30)}
    rel = OPS.get("resize")(factor=0.5, relative_to="lr")
    assert _sample(rel, 1, img=np.zeros((90, 70, 3), np.uint8), lr_size=(20, 10))[0]["width"] == 10
    with pytest.raises(ConfigError, match="needs the dataset's scale"):
        _sample(rel, 1, lr_size=None)
    assert Chain.from_dict({"steps": [{"op": "resize", "factor": 0.5, "relative_to": "lr"}]}).uses_lr_size


# ---------------------------------------------------------------------------------------------------------
# random_order


def _order_chain() -> Chain:
    return Chain.from_dict({"scale": 2, "steps": [{"op": "random_order", "steps": [
        [{"op": "resize", "size": "lr", "interpolation": "bilinear"}, {"op": "sinc", "p": 0.5}],
        {"op": "jpeg", "quality": [30, 60]},
        {"op": "noise", "sigma": 5.0}]}]})


def test_random_order_permutes_and_replays(photo):
    chain = _order_chain()
    orders = set()
    for seed in range(30):
        out = chain.run(photo, np.random.default_rng(seed), lr_size=(32, 32))
        rec = out.record["steps"][0]
        orders.add(tuple(rec["order"]))
        assert out.image.shape == (32, 32, 3)
        assert [[r["op"] for r in rnd] for rnd in rec["rounds"]] == \
            [[["resize", "sinc"], ["jpeg"], ["noise"]][i] for i in rec["order"]]
        again = chain.replay(photo, json.loads(json.dumps(out.record)))
        assert again.image.tobytes() == out.image.tobytes() and again.encoded == out.encoded
        same = chain.run(photo, np.random.default_rng(seed), lr_size=(32, 32))
        assert same.record == out.record and same.image.tobytes() == out.image.tobytes()
    assert len(orders) == 6  # every order of three items appears


def test_random_order_round_trips_through_yaml_and_rejects_a_foreign_record(photo):
    chain = _order_chain()
    assert Chain.from_dict(chain.to_dict()).to_dict() == chain.to_dict()
    rec = chain.run(photo, np.random.default_rng(0), lr_size=(32, 32)).record
    rec["steps"][0]["order"] = [0, 0, 1]
    with pytest.raises(ConfigError, match="does not match"):
        chain.replay(photo, rec)


# ---------------------------------------------------------------------------------------------------------
# usm_sharpen


def test_usm_sharpen_raises_edge_contrast_and_keeps_flat_areas(photo):
    flat = np.full((40, 40, 3), 120, np.uint8)
    np.testing.assert_array_equal(F.usm_sharpen(flat), flat)
    edge = flat.copy()
    edge[:, 20:] = 170
    before = edge.copy()
    out = F.usm_sharpen(edge)
    np.testing.assert_array_equal(edge, before)
    assert out.dtype == np.uint8 and out.shape == edge.shape
    assert out[:, 17:20].min() < 120 and out[:, 20:23].max() > 170  # overshoot on both sides
    assert int(out[:, 20:23].mean()) - int(out[:, 17:20].mean()) > 50
    np.testing.assert_array_equal(out[:, 0], out[:, 0][:1].repeat(40, 0))  # rows unchanged along the edge
    np.testing.assert_array_equal(F.usm_sharpen(edge, threshold=255), edge)  # nothing passes the mask
    sharp = F.usm_sharpen(photo, weight=0.5, radius=50, threshold=10)
    assert np.abs(cv2.Laplacian(sharp, cv2.CV_32F)).mean() > np.abs(cv2.Laplacian(photo, cv2.CV_32F)).mean()


# ---------------------------------------------------------------------------------------------------------
# the preset


def test_realesrgan_preset_x4_deterministic_and_replayable(photo):
    chain = load_preset("realesrgan")
    assert chain.scale == 4 and chain.uses_lr_size
    seen_orders = set()
    for seed in range(8):
        out = chain.run(photo, np.random.default_rng(seed), lr_size=(16, 16))
        assert out.image.shape == (16, 16, 3) and out.image.dtype == np.uint8 and out.size == (16, 16)
        again = chain.run(photo, np.random.default_rng(seed), lr_size=(16, 16))
        assert again.record == out.record and again.image.tobytes() == out.image.tobytes()
        assert again.encoded == out.encoded
        replayed = chain.replay(photo, json.loads(json.dumps(out.record)))
        assert replayed.image.tobytes() == out.image.tobytes() and replayed.encoded == out.encoded
        seen_orders.add(tuple(out.record["steps"][-1]["order"]))
    assert seen_orders == {(0, 1), (1, 0)}


# ---------------------------------------------------------------------------------------------------------
# hostile parameters: one-line ConfigErrors naming what is valid


@pytest.mark.parametrize("name, params, needles", [
    ("blur", {"kernels": {"gaussian": 1}}, ["gaussian", "valid: iso, aniso, generalized_iso"]),
    ("blur", {"kernels": ["box"]}, ["box", "plateau_aniso"]),
    ("blur", {"kernels": {"iso": -1}}, ["'iso'", ">= 0"]),
    ("blur", {"kernels": {"iso": 0}}, ["zero"]),
    ("blur", {"kernels": "iso"}, ["kernels", "iso, aniso"]),
    ("blur", {"kernel_size": [21, 7]}, ["kernel_size"]),
    ("blur", {"sigma": [0.0, 3.0]}, ["sigma"]),
    ("blur", {"sinc_p": 2}, ["sinc_p"]),
    ("blur", {"kernel": "iso"}, ["kernel", "valid: betag, betap, kernel_size, kernels"]),
    ("sinc", {"omega_c": 4.0}, ["omega_c"]),
    ("sinc", {"cutoff": 1.0}, ["valid: kernel_size, omega_c"]),
    ("resize", {"factor": [0.5, 2], "updown": {"sideways": 1}}, ["sideways", "valid: up, down, keep"]),
    ("resize", {"factor": 0.5, "updown": {"up": 1}}, ["updown", "range"]),
    ("resize", {"factor": [1.2, 2], "updown": {"up": 1}}, ["updown", "low <= 1 <= high"]),
    ("resize", {"size": 64, "updown": {"up": 1}}, ["need a factor"]),
    ("resize", {"size": 64, "relative_to": "lr"}, ["need a factor"]),
    ("resize", {"factor": 0.5, "relative_to": "output"}, ["relative_to", "input, lr"]),
    ("resize", {"factor": 0.5, "relative_to": ["input", "lr"]}, ["relative_to"]),
    ("random_order", {}, ["random_order.steps"]),
    ("random_order", {"steps": [{"op": "blurr"}]}, ["blurr", "valid:", "random_order"]),
    ("random_order", {"steps": [[]]}, ["random_order.steps[0]"]),
])
def test_hostile_params_give_one_line_config_errors(name, params, needles):
    with pytest.raises(ConfigError) as exc:
        OPS.get(name)(**params)
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg

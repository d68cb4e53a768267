"""Loss options from configuration: the `vgg` loss's networks, layer names and options against a hand
computation, nested specs ({name: {weight: w, option: value}}), one-line errors listing the valid names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crappify.errors import ConfigError
from srgan.losses import LOSSES, build_loss, gram_matrix, vgg_features, vgg_layer_index, vgg_layer_names


@pytest.mark.parametrize("net, name, index", [
    ("vgg16", "conv2_2", 7), ("vgg16", "relu2_2", 8), ("vgg16", "pool2", 9), ("vgg16", "conv5_3", 28),
    ("vgg19", "conv5_4", 34), ("vgg19", "relu5_4", 35), ("vgg19", "conv1_2", 2),
    ("vgg16_bn", "conv2_2", 10), ("vgg16_bn", "relu2_2", 12), ("vgg16_bn", "relu5_3", 42),
])
def test_layer_names_before_and_after_the_activation(net, name, index):
    assert vgg_layer_index(net, name) == index
    layers = vgg_features(net, index, pretrained=False)
    kind = type(layers[index]).__name__
    assert kind == {"conv": "Conv2d", "relu": "ReLU", "pool": "MaxPool2d"}[name[:4].rstrip("0123456789_")]


def test_every_layer_is_named_once():
    for net in ("vgg16", "vgg16_bn", "vgg19"):
        names = vgg_layer_names(net)
        assert len(set(names.values())) == len(names)
    assert vgg_layer_index("vgg19", 35) == 35  # indices pass through


def test_vgg_loss_against_a_hand_computation():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 24, 24), torch.randn(2, 3, 24, 24)
    spec = {"vgg": {"weight": 0.5, "net": "vgg16", "layers": ["conv2_2", "relu3_3"], "layer_weights": [0.1, 2.0],
                    "criterion": "mse", "feature_scale": 1 / 12.75, "gram_weight": 3.0}}
    torch.manual_seed(1)
    loss = build_loss(spec, pretrained=False)
    net = loss.parts["vgg"].net
    with torch.no_grad():
        def feats(x):
            out = {}
            for i, layer in enumerate(net):
                x = layer(x)
                out[i] = x
            return out
        fp, ft = feats(pred), feats(target)
        want = 0.0
        for idx, w in ((7, 0.1), (15, 2.0)):
            a, b = fp[idx] / 12.75, ft[idx] / 12.75
            want += w * F.mse_loss(a, b) + 3.0 * w * F.mse_loss(gram_matrix(a), gram_matrix(b))
        got = loss(pred, target)
    assert torch.allclose(got, 0.5 * want, rtol=1e-5)
    assert loss.spec == {"vgg": 0.5}


def test_nested_spec_with_other_parts_and_weights():
    loss = build_loss({"vgg": {"net": "vgg19", "layers": ["relu5_4"], "criterion": "mse"}, "tv": 2e-8, "l1": 1},
                      pretrained=False)
    assert loss.spec == {"vgg": 1.0, "tv": 2e-8, "l1": 1.0}  # weight 1 when the nested mapping has none
    assert loss.parts["vgg"].layer_ids == (35,) and loss.parts["vgg"].criterion == "mse"
    # the SRGAN content loss's feature_scale is reachable the same way
    assert build_loss({"vgg19": {"feature_scale": 1 / 12.75}}, pretrained=False).parts["vgg19"].feature_scale \
        == pytest.approx(1 / 12.75)


@pytest.mark.parametrize("spec, match", [
    ({"vgg": {"layers": ["conv9_9"]}}, r"unknown vgg19 layer 'conv9_9'; valid: convB_K .*relu5_4"),
    ({"vgg": {"net": "vgg11"}}, r"unknown net 'vgg11'; valid: vgg16, vgg16_bn, vgg19"),
    ({"vgg": {"criterion": "huber"}}, "criterion"),
    ({"vgg": {"layerz": [1]}}, r"unknown option\(s\) layerz for loss 'vgg'; valid: .*layer_weights, layers"),
    ({"vgg": {"layers": ["relu2_2"], "layer_weights": [1, 2]}}, "2 layer_weights for 1 layers"),
    ({"vgg": {"weight": -1}}, "weight of loss 'vgg'"),
    ({"vgg": {"layers": [99]}}, "out of range"),
    ({"vgx": 1.0}, "valid: "),
])
def test_bad_loss_options_are_one_line_errors(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_loss(spec, pretrained=False)
    assert "\n" not in str(err.value)


def test_vgg_is_registered():
    assert "vgg" in LOSSES.names()


def test_nested_loss_from_a_config_file_trains_and_is_saved_resolved(sr_dataset, tmp_path):
    import yaml

    from crappify.config import resolve
    from srgan.train_gen import Trainer, TrainGenConfig

    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text(
        "arch: unet-small\npretrained: false\nsize: 32\nbs: 4\nepochs: 1\npreview_items: 0\nprecision: fp32\n"
        "loss:\n  vgg: {weight: 0.5, net: vgg16, layers: [relu1_2, conv2_2], criterion: mse}\n  l1: 1.0\n")
    cfg = resolve(TrainGenConfig, cfg_file, data=str(sr_dataset), out=str(tmp_path / "run"))
    Trainer(cfg, progress=False).fit()
    saved = yaml.safe_load((tmp_path / "run" / "train-gen.yaml").read_text())
    assert saved["loss"] == {"vgg": {"weight": 0.5, "net": "vgg16", "layers": ["relu1_2", "conv2_2"],
                                     "criterion": "mse"}, "l1": 1.0}
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {vgg: {layers: [conv2_9]}}\n")
    with pytest.raises(ConfigError, match="unknown vgg19 layer 'conv2_9'"):
        Trainer(resolve(TrainGenConfig, bad, data=str(sr_dataset), out=str(tmp_path / "r2"), pretrained=False),
                progress=False).fit()


@pytest.mark.parametrize("loss, match", [
    ({"vgg": {"net": "vgg16", "layers": ["conv5_4"]}}, "unknown vgg16 layer 'conv5_4'; valid: .*conv5_3"),
    ({"vgg": {"weight": 1.0, "crit": "l1"}}, r"unknown option\(s\) crit for loss 'vgg'; valid: criterion"),
    ({"perceptual": 1.0}, "unknown loss 'perceptual'; valid: .*vgg"),
])
def test_a_pipeline_with_a_bad_loss_is_refused_before_anything_runs(tmp_path, loss, match):
    """Loss specs are validated at the config's edge (train-gen, train-gan, a pipeline's stages), not when the
    stage that uses them starts hours later."""
    import yaml

    from srgan.pipeline import load_pipeline, stage_configs
    from srgan.train_gan import TrainGanConfig
    from srgan.train_gen import TrainGenConfig

    for cls in (TrainGenConfig, TrainGanConfig):
        with pytest.raises(ValueError, match=match):
            cls(data="d", out="o", loss=loss)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "out": str(tmp_path / "out"), "build-dataset": {"src": "samples",
                                    "source": "samples", "preset": "srgan-x4"}, "train-gen": {"arch": "srresnet"},
                                    "train-gan": {"critic_arch": "patch", "loss": loss}}))
    with pytest.raises(ConfigError, match=f"stage train-gan: .*{match}"):
        stage_configs(load_pipeline(path))

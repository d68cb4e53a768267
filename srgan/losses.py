"""Training losses for the generator: pixel, perceptual (VGG feature) and total-variation losses.

Every loss is an `nn.Module` called as ``loss(pred, target)`` on ImageNet-normalised images (N, 3, H, W)
— the normalisation the VGG networks were trained with, so images go into them as they are — and
returns a float32 scalar (float64 for float64 inputs). The losses live in one registry, `LOSSES`, and
`build_loss` turns a spec (``"feature"`` or ``{"l1": 1.0, "tv": 1e-4}``) into a `CombinedLoss`, the
weighted sum of its parts.

- ``l1``, ``mse``: pixel losses.
- ``feature``: the fastai course's (lesson 7) feature loss on VGG16-bn: pixel L1 + Σ w·L1(features)
  + Σ w²·5e3·L1(gram) on the ReLU outputs just before the max-pools of blocks 2–4 (indices 22, 32, 42 of
  torchvision's ``vgg16_bn().features``), layer weights [5, 15, 2].
- ``vgg19``: the SRGAN content loss (Ledig et al. 2017) on VGG19 φ5,4 (``vgg19().features[:36]``).
- ``vgg``: any VGG (vgg16, vgg16_bn, vgg19), layers by name before (`conv5_4`) or after (`relu5_4`) the
  activation, layer weights, L1/MSE, feature scale, Gram term: the recipes' perceptual losses as options.
- ``tv``: total variation of the prediction.

Loss networks are frozen (no parameter requires grad), stay in eval mode whatever ``.train()`` is
called on, are cut after the last layer they need, and belong to the loss module only — never to the
generator, so they are never saved with it. They follow the inputs' device (and, outside autocast,
their floating dtype); under autocast the features are computed in the autocast dtype and every
reduction is done in float32.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator
from torch import Tensor, nn

from crappify.errors import ConfigError, brief
from crappify.registry import Registry
from srgan.weights import WeightsError, torchvision_state_dict

LossFactory = Callable[..., nn.Module]

LOSSES: Registry[LossFactory] = Registry("loss", reserved=("pretrained", "weights"))

# torchvision's VGG layouts ("D" = VGG16, "E" = VGG19): channel counts, "M" for a max-pool; and BatchNorm.
_VGG_CFGS: dict[str, tuple[list[int | str], bool]] = {
    "vgg16": ([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"], False),
    "vgg16_bn": ([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"], True),
    "vgg19": ([64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
               512, 512, 512, 512, "M"], False),
}
VGG_WEIGHTS: dict[str, str] = {
    "vgg16": "VGG16_Weights.IMAGENET1K_V1",
    "vgg16_bn": "VGG16_BN_Weights.IMAGENET1K_V1",
    "vgg19": "VGG19_Weights.IMAGENET1K_V1",
}


# --------------------------------------------------------------------------------------------------
# Frozen VGG feature extractors


class FrozenFeatures(nn.Sequential):
    """A prefix of a VGG ``.features`` stack that never trains: BatchNorm stays in eval mode."""

    def train(self, mode: bool = True) -> FrozenFeatures:
        """Ignore `mode`: the loss network is always in eval mode."""
        return super().train(False)


def _vgg_layers(arch: str) -> list[nn.Module]:
    cfg, batch_norm = _VGG_CFGS[arch]
    layers: list[nn.Module] = []
    channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    return layers


def vgg_depth(arch: str) -> int:
    """Number of layers in the full ``.features`` stack of torchvision's `arch` ('vgg16_bn', 'vgg19')."""
    cfg, batch_norm = _VGG_CFGS[arch]
    return sum(1 if v == "M" else 3 if batch_norm else 2 for v in cfg)


def vgg_layer_names(arch: str) -> dict[str, int]:
    """Layer names of torchvision's `arch` `.features`, to index: `convB_K` is the K-th conv of block B, its
    output *before* the activation (and before BatchNorm in vgg16_bn) — the layers Real-ESRGAN/BasicSR name
    (`conv5_4`); `reluB_K` is the same layer *after* its ReLU — what Keras' `blockB_convK` outputs (its convs
    carry their ReLU) and the SRGAN paper's φB,K; `poolB` is block B's max-pool."""
    cfg, batch_norm = _VGG_CFGS[arch]
    names: dict[str, int] = {}
    index, block, conv = 0, 1, 0
    for v in cfg:
        if v == "M":
            names[f"pool{block}"] = index
            index, block, conv = index + 1, block + 1, 0
            continue
        conv += 1
        names[f"conv{block}_{conv}"] = index
        names[f"relu{block}_{conv}"] = index + (2 if batch_norm else 1)
        index += 3 if batch_norm else 2
    return names


def vgg_layer_index(arch: str, layer: int | str) -> int:
    """The `.features` index of `layer` (a name from `vgg_layer_names` or an index), or a ConfigError listing
    the valid names."""
    if arch not in _VGG_CFGS:
        raise ConfigError(f"unknown loss network {arch!r}; valid: {', '.join(sorted(_VGG_CFGS))}")
    depth = vgg_depth(arch)
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise ConfigError(f"a {arch} layer is a name (conv2_2, relu5_4, ...) or an index, not {layer!r}")
    if isinstance(layer, int):
        if not 0 <= layer < depth:
            raise ConfigError(f"{arch} layer index {layer} out of range 0..{depth - 1}")
        return layer
    names = vgg_layer_names(arch)
    if layer not in names:
        raise ConfigError(f"unknown {arch} layer {layer!r}; valid: convB_K (before the activation), reluB_K "
                          f"(after it), poolB: {', '.join(names)}")
    return names[layer]


def _features_state(state: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """The entries of a VGG state dict (whole model or `.features` only) for the first `depth` layers."""
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    kept = {}
    for key, value in state.items():
        index = key.split(".", 1)[0]
        if index.isdigit() and int(index) < depth:
            kept[key] = value
    return kept


def vgg_features(arch: str, last: int, *, pretrained: bool = True,
                 weights: str | Path | None = None) -> FrozenFeatures:
    """Frozen layers 0..`last` of torchvision's `arch` `.features`, in eval mode.

    With a `weights` file its tensors are loaded; else with `pretrained` the ImageNet weights come from
    torchvision's cache (WeightsError at once when absent); else the weights are random (torchvision's init).
    """
    if arch not in _VGG_CFGS:
        raise ConfigError(f"unknown loss network {arch!r}; valid: {', '.join(sorted(_VGG_CFGS))}")
    depth = vgg_depth(arch)
    if not 0 <= last < depth:
        raise ConfigError(f"{arch} layer index {last} out of range 0..{depth - 1}")
    state = None
    if weights is not None or pretrained:  # read (or fail) before building anything
        state = torchvision_state_dict(VGG_WEIGHTS[arch], local=weights)
    net = FrozenFeatures(*_vgg_layers(arch)[: last + 1])
    if state is not None:
        try:
            net.load_state_dict(_features_state(state, len(net)), strict=True)
        except RuntimeError as exc:
            source = weights if weights is not None else VGG_WEIGHTS[arch]
            detail = " ".join(str(exc).split())[:300]
            raise WeightsError(f"weights from {source} do not fit {arch}: {detail}") from None
    else:
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    net.requires_grad_(False)
    return net.eval()


def gram_matrix(x: Tensor) -> Tensor:
    """Per-sample Gram matrix of feature maps (N, C, H, W) -> (N, C, C), divided by C·H·W."""
    n, c, h, w = x.shape
    f = x.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def _wide(x: Tensor) -> Tensor:
    """`x` in float32 when it is in a lower precision (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):
        return False


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for `device`, so reductions run in float32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


class _NetworkLoss(nn.Module):
    """Base of the losses that run a frozen network; keeps it in eval mode and on the inputs' device."""

    net: FrozenFeatures

    def train(self, mode: bool = True) -> _NetworkLoss:
        """Set this module's mode; the loss network stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    def _prepare(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Move the network to pred's device and, outside autocast, its float dtype; target follows pred."""
        param = next(self.net.parameters())
        if param.device != pred.device:
            self.to(pred.device)
        if _autocast_on(pred.device):  # autocast casts for the convolutions; keep the inputs' precision
            return pred, target.to(pred.device)
        if pred.is_floating_point() and pred.dtype != param.dtype:
            self.to(dtype=pred.dtype)
        pred = pred.to(next(self.net.parameters()).dtype)
        return pred, target.to(device=pred.device, dtype=pred.dtype)

    def _features(self, x: Tensor, ids: Sequence[int]) -> list[Tensor]:
        wanted = set(ids)
        found: dict[int, Tensor] = {}
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in wanted:
                found[i] = x
        return [found[i] for i in ids]

    def _target_features(self, target: Tensor, ids: Sequence[int]) -> list[Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
            return self._features(target, ids)


# --------------------------------------------------------------------------------------------------
# The losses


@LOSSES.register("l1")
class L1Loss(nn.Module):
    """Mean absolute pixel difference."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """L1 between `pred` and `target`, in float32."""
        with _float32(pred.device):
            return F.l1_loss(_wide(pred), _wide(target.to(pred.device)))


@LOSSES.register("mse")
class MSELoss(nn.Module):
    """Mean squared pixel difference."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """MSE between `pred` and `target`, in float32."""
        with _float32(pred.device):
            return F.mse_loss(_wide(pred), _wide(target.to(pred.device)))


@LOSSES.register("tv")
class TVLoss(nn.Module):
    """Anisotropic total variation of `pred`: mean |vertical neighbour difference| + mean |horizontal|.

    The target is ignored. A constant image gives 0.
    """

    def forward(self, pred: Tensor, target: Tensor | None = None) -> Tensor:
        """Total variation of `pred`, in float32."""
        with _float32(pred.device):
            x = _wide(pred)
            total = x.new_zeros(())
            if x.shape[-2] > 1:
                total = total + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            if x.shape[-1] > 1:
                total = total + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            return total


@LOSSES.register("feature")
class FeatureLoss(_NetworkLoss):
    """The fastai course's (lesson 7) feature loss on frozen VGG16-bn.

    ``L1(pred, target) + Σ_i w_i·L1(φ_i(pred), φ_i(target)) + Σ_i w_i²·gram_weight·L1(G(φ_i(pred)), G(φ_i(target)))``
    with φ_i the `layer_ids` activations of ``vgg16_bn().features`` (default: the ReLUs just before the
    max-pools of blocks 2–4, 22/32/42), w = `layer_weights` ([5, 15, 2]), G = `gram_matrix`,
    `gram_weight` 5e3 (0 drops the Gram term, as DeOldify does). After each call, `terms` holds the
    weighted terms ('pixel', 'feat_i', 'gram_i') as detached tensors; their sum is the loss.
    """

    arch = "vgg16_bn"

    def __init__(self, *, pretrained: bool = True, weights: str | Path | None = None,
                 layer_ids: Sequence[int] = (22, 32, 42), layer_weights: Sequence[float] = (5.0, 15.0, 2.0),
                 gram_weight: float = 5e3) -> None:
        super().__init__()
        ids = [_as_int("layer_ids", i) for i in _as_seq("layer_ids", layer_ids)]
        lw = [_as_weight("layer_weights", w) for w in _as_seq("layer_weights", layer_weights)]
        if not ids:
            raise ConfigError("feature loss: layer_ids is empty")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"feature loss: repeated layer ids in {ids}")
        if len(lw) != len(ids):
            raise ConfigError(f"feature loss: {len(lw)} layer_weights for {len(ids)} layer_ids")
        depth = vgg_depth(self.arch)
        if not all(0 <= i < depth for i in ids):
            raise ConfigError(f"feature loss: layer_ids {ids} must lie in 0..{depth - 1} of {self.arch}.features")
        self.layer_ids = tuple(ids)
        self.layer_weights = tuple(lw)
        self.gram_weight = _as_weight("gram_weight", gram_weight)
        self.net = vgg_features(self.arch, max(ids), pretrained=pretrained, weights=weights)
        for i in ids:  # an in-place ReLU right after a tapped layer would overwrite the tapped activation
            if i + 1 < len(self.net) and isinstance(self.net[i + 1], nn.ReLU):
                self.net[i + 1] = nn.ReLU(inplace=False)
        self.terms: dict[str, Tensor] = {}

    def features(self, x: Tensor) -> list[Tensor]:
        """The tapped activations of `x`, in `layer_ids` order."""
        return self._features(x, self.layer_ids)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """The feature loss of `pred` against `target` (float32 scalar)."""
        pred, target = self._prepare(pred, target)
        in_feats = self.features(pred)
        out_feats = self._target_features(target, self.layer_ids)
        with _float32(pred.device):
            terms = {"pixel": F.l1_loss(_wide(pred), _wide(target))}
            for k, (fi, fo, w) in enumerate(zip(in_feats, out_feats, self.layer_weights, strict=True)):
                fi, fo = _wide(fi), _wide(fo)
                terms[f"feat_{k}"] = w * F.l1_loss(fi, fo)
                if self.gram_weight:
                    terms[f"gram_{k}"] = w**2 * self.gram_weight * F.l1_loss(gram_matrix(fi), gram_matrix(fo))
            total = torch.stack(list(terms.values())).sum()
        self.terms = {k: v.detach() for k, v in terms.items()}
        return total


@LOSSES.register("vgg")
class VGGLoss(_NetworkLoss):
    """A perceptual loss on any VGG's layers, every choice an option (what recipes differ in):

    ``Σ_i w_i·criterion(s·φ_i(pred), s·φ_i(target)) + gram_weight·Σ_i w_i·criterion(G(s·φ_i(pred)), G(s·φ_i(target)))``

    `net` vgg16 | vgg16_bn | vgg19; `layers` names (`conv5_4` before the activation, `relu5_4` after it, see
    `vgg_layer_names`) or indices of ``.features``; `layer_weights` (default 1 each); `criterion` l1 | mse;
    `feature_scale` s (the SRGAN paper's 1/12.75); `gram_weight` for a style term (0: none). Defaults: VGG19
    conv5_4 (vgg16: conv5_3) before the activation, L1 (Real-ESRGAN's perceptual loss uses conv1_2 … conv5_4
    with weights 0.1, 0.1, 1, 1, 1).
    """

    def __init__(self, *, pretrained: bool = True, weights: str | Path | None = None, net: str = "vgg19",
                 layers: Sequence[int | str] | None = None, layer_weights: Sequence[float] | None = None,
                 criterion: str = "l1", feature_scale: float = 1.0, gram_weight: float = 0.0) -> None:
        super().__init__()
        if net not in _VGG_CFGS:
            raise ConfigError(f"vgg loss: unknown net {brief(net)}; valid: {', '.join(sorted(_VGG_CFGS))}")
        if criterion not in ("l1", "mse"):
            raise ConfigError(f"vgg loss: criterion must be 'l1' or 'mse', not {brief(criterion)}")
        if layers is None:  # the last conv before the last max-pool, before its activation
            layers = ["conv5_4" if net == "vgg19" else "conv5_3"]
        ids = [vgg_layer_index(net, layer) for layer in _as_seq("layers", layers)]
        if not ids or len(set(ids)) != len(ids):
            raise ConfigError(f"vgg loss: layers must be distinct and at least one, got {brief(list(layers))}")
        lw = [1.0] * len(ids) if layer_weights is None else [
            _as_weight("layer_weights", w) for w in _as_seq("layer_weights", layer_weights)]
        if len(lw) != len(ids):
            raise ConfigError(f"vgg loss: {len(lw)} layer_weights for {len(ids)} layers")
        self.arch, self.layer_ids, self.layer_weights = net, tuple(ids), tuple(lw)
        self.criterion = criterion
        self.feature_scale = _as_weight("feature_scale", feature_scale)
        self.gram_weight = _as_weight("gram_weight", gram_weight)
        self.net = vgg_features(net, max(ids), pretrained=pretrained, weights=weights)
        for i in ids:  # an in-place ReLU right after a tapped layer would overwrite the tapped activation
            if i + 1 < len(self.net) and isinstance(self.net[i + 1], nn.ReLU):
                self.net[i + 1] = nn.ReLU(inplace=False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """The perceptual loss of `pred` against `target` (float32 scalar)."""
        pred, target = self._prepare(pred, target)
        in_feats = self._features(pred, self.layer_ids)
        out_feats = self._target_features(target, self.layer_ids)
        loss = F.mse_loss if self.criterion == "mse" else F.l1_loss
        with _float32(pred.device):
            total = pred.new_zeros((), dtype=torch.float32 if pred.dtype != torch.float64 else pred.dtype)
            for fi, fo, w in zip(in_feats, out_feats, self.layer_weights, strict=True):
                fi, fo = _wide(fi) * self.feature_scale, _wide(fo) * self.feature_scale
                total = total + w * loss(fi, fo)
                if self.gram_weight:
                    total = total + self.gram_weight * w * loss(gram_matrix(fi), gram_matrix(fo))
            return total


@LOSSES.register("vgg19")
class VGG19ContentLoss(_NetworkLoss):
    """The SRGAN content loss: `criterion` ('mse', as in the paper, or 'l1') on VGG19 φ5,4 features.

    φ5,4 is the output of the 4th conv of block 5 after its ReLU, before the 5th max-pool
    (``vgg19().features[:36]``). Both feature maps are multiplied by `feature_scale` first: the paper
    rescales them by 1/12.75 so the loss is comparable to pixel MSE (i.e. the MSE shrinks by
    12.75² ≈ 163); common ports instead weight the loss by about 6e-3. The default 1.0 leaves them as they are.
    """

    arch = "vgg19"
    layer_id = 35

    def __init__(self, *, pretrained: bool = True, weights: str | Path | None = None, criterion: str = "mse",
                 feature_scale: float = 1.0) -> None:
        super().__init__()
        if criterion not in ("l1", "mse"):
            raise ConfigError(f"vgg19 loss: criterion must be 'l1' or 'mse', not {brief(criterion)}")
        self.criterion = criterion
        self.feature_scale = _as_weight("feature_scale", feature_scale)
        self.net = vgg_features(self.arch, self.layer_id, pretrained=pretrained, weights=weights)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """The content loss of `pred` against `target` (float32 scalar)."""
        pred, target = self._prepare(pred, target)
        (fi,) = self._features(pred, (self.layer_id,))
        (fo,) = self._target_features(target, (self.layer_id,))
        loss = F.mse_loss if self.criterion == "mse" else F.l1_loss
        with _float32(pred.device):
            return loss(_wide(fi) * self.feature_scale, _wide(fo) * self.feature_scale)


def _as_seq(name: str, value: object) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list, not {value!r}")
    return list(value)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must hold integers, not {value!r}")
    return value


def _as_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# Combining


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; `last` gives each part's latest unweighted value for logging."""

    def __init__(self, parts: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        if set(parts) != set(weights):
            raise ValueError(f"parts {sorted(parts)} and weights {sorted(weights)} differ")
        self.parts = nn.ModuleDict(dict(parts))
        self.weights = {name: float(weights[name]) for name in parts}
        self._last: dict[str, Tensor] = {}

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Σ weight·part(pred, target), a float32 scalar."""
        total: Tensor | None = None
        last: dict[str, Tensor] = {}
        for name, part in self.parts.items():
            value = part(pred, target)
            last[name] = value.detach()
            # A weight of 1 adds the value as it is (x · 1.0 == x exactly): under torch.compile (torch 2.14),
            # returning `value * 1.0` while `value.detach()` is kept made the returned loss lose its grad_fn.
            weight = self.weights[name]
            term = _wide(value) if weight == 1.0 else _wide(value) * weight
            total = term if total is None else total + term
        assert total is not None
        # a new dict each call, not the old one filled in: torch.compile guards on a mutated dict's keys, so the
        # first call's (empty → filled) would compile the loss twice
        self._last = last
        return total

    @property
    def last(self) -> dict[str, float]:
        """Each part's unweighted value from the latest call (empty before the first)."""
        return {name: float(value) for name, value in self._last.items()}

    @property
    def spec(self) -> dict[str, float]:
        """The {name: weight} mapping this loss was built from."""
        return dict(self.weights)


def _parse_spec(spec: object) -> tuple[dict[str, float], dict[str, dict[str, object]]]:
    """({name: weight}, {name: options}) from a loss name, {name: weight} or {name: {weight: w, option: ...}}."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ConfigError(f"empty loss name; valid: {', '.join(LOSSES.names())}")
        return {spec.strip(): 1.0}, {}
    if isinstance(spec, Mapping):
        if not spec:
            raise ConfigError(f"empty loss mapping; give at least one of: {', '.join(LOSSES.names())}")
        out, options = {}, {}
        for name, value in spec.items():
            if not isinstance(name, str):
                raise ConfigError(f"loss names must be strings, not {name!r}")
            if isinstance(value, Mapping):  # {vgg: {weight: 1, net: vgg16, layers: [relu2_2]}}
                value = dict(value)
                out[name] = _as_weight(f"weight of loss {name!r}", value.pop("weight", 1.0))
                options[name] = value
            else:
                out[name] = _as_weight(f"weight of loss {name!r}", value)
        return out, options
    raise ConfigError(f"a loss spec is a name, a {{name: weight}} mapping or {{name: {{weight: w, option: value}}}}, "
                      f"not {brief(spec)}")


def _weights_file(name: str, factory: LossFactory, weights: Mapping[str, str] | None) -> str | None:
    if not weights:
        return None
    arch = getattr(factory, "arch", None)
    for key in (name, arch, VGG_WEIGHTS.get(arch or "")):
        if key and weights.get(key):
            return weights[key]
    return None


def check_loss_spec(spec: str | Mapping[str, Any] | None) -> str | Mapping[str, Any] | None:
    """`spec` unchanged if `build_loss` would accept it; else the ConfigError it would raise (unknown loss, option
    or layer, listing the valid ones). The networks are built on PyTorch's meta device without weights, so a
    config is checked at its edge, before any stage runs, in milliseconds."""
    if spec is not None:
        with torch.device("meta"):
            build_loss(spec, pretrained=False)
    return spec


# A loss spec as stage configs take it: a name, {name: weight} or {name: {weight: w, option: value}}, checked when
# the config is validated (train-gen, train-gan, every pipeline stage), not when the stage starts.
LossSpec = Annotated[str | dict[str, float | dict[str, Any]] | None, AfterValidator(check_loss_spec)]


def build_loss(spec: str | Mapping[str, float], *, pretrained: bool = True,
               weights: Mapping[str, str] | None = None, **options: object) -> CombinedLoss:
    """Build the `CombinedLoss` for `spec`: a loss name ("feature"), {name: weight} ({"l1": 1, "tv": 1e-4}) or
    {name: {weight: w, option: value}} ({"vgg": {"weight": 1, "net": "vgg16", "layers": ["relu2_2"]}}).

    `pretrained`: ImageNet weights for loss networks from torchvision's cache (WeightsError naming
    --no-pretrained when absent) or random ones when False. `weights`: local weight files keyed by loss
    name ('feature'), network ('vgg16_bn', 'vgg19') or torchvision weights name; a file given is always
    used; keys matching no part are ignored (the mapping may hold other models' files too).
    `options` go to every part that takes them (e.g. gram_weight=0 to 'feature'), or to one part as
    ``feature={"gram_weight": 0}``; an option no part takes is a ConfigError.
    """
    parts, spec_options = _parse_spec(spec)
    factories = {name: LOSSES.get(name) for name in parts}  # unknown names fail here, listing the valid ones
    accepted = {name: list(LOSSES.options(name)) for name in factories}
    kwargs: dict[str, dict[str, object]] = {name: {} for name in parts}
    nested = {k: v for k, v in options.items() if k in parts and isinstance(v, Mapping)}
    for name, sub in spec_options.items():  # options written in the spec itself
        nested[name] = {**sub, **nested.get(name, {})}
    for key, value in options.items():
        if key in nested:
            continue
        takers = [name for name in parts if key in accepted[name]]
        if not takers:
            valid = sorted({o for opts in accepted.values() for o in opts})
            raise ConfigError(f"unknown loss option {key!r} for {', '.join(parts)}; "
                              f"valid: {', '.join(valid) or 'none'}")
        for name in takers:
            kwargs[name][key] = value
    for name, sub in nested.items():
        LOSSES.resolve_options(name, sub)  # an unknown option is a ConfigError listing the valid ones
        kwargs[name].update(sub)
    modules: dict[str, nn.Module] = {}
    for name, factory in factories.items():
        params = inspect.signature(factory).parameters
        args = dict(kwargs[name])
        if "pretrained" in params:
            args["pretrained"] = pretrained
        if "weights" in params:
            args["weights"] = _weights_file(name, factory, weights)
        modules[name] = factory(**args)
    return CombinedLoss(modules, parts)

"""`crappify run PIPELINE --smoke`: every stage of a pipeline at toy size, to check that the recipe runs.

`smoke_overrides` shrinks one stage's validated config by its keys, the same way for every stage that has
the key, so a new pipeline (or a new stage option) needs no code here. What a recipe *is* stays as written:
architectures and their options, losses (weights, layers, criteria), critic, adversarial loss and its
weights, switching mode, optimiser settings (lr, betas, wd, pct_start), the preset and scale of the dataset,
the number of train-gen stages and their learning rates, EMA, seeds. Pretrained weights are switched off (no
download), so a pretrained U-Net's frozen-encoder phases do not run: train-gen freezes only ImageNet encoders.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from crappify.errors import ConfigError

HR_SIZE = 64        # the smoke dataset's HR short side (sample-crops' crop size too)
CROP = 32           # training crop size, raised to a critic's minimum input (rounded up to a multiple of 32)
BATCH = 2           # the smallest batch BatchNorm trains with
ITEMS = 4           # sample photos in the dataset: with the default split, 2 train, 1 valid, 1 test
CROPS = {"train": 4, "valid": 1, "test": 2}  # sample-crops per split (a pipeline that cuts its own crops)
EVAL_ITEMS = 2      # evaluate scores at most this many pairs
GAN_ITERS = {"adaptive": 4, "per-batch": 2}  # train-gan steps by switching (fixed: n_crit + n_gen; other: 2)

# Every key smoke_overrides may change, by the stages that have it (docs/pipelines.md, "Smoke runs", lists them).
SMOKE_KEYS: dict[str, tuple[str, ...]] = {
    "sample-crops": ("size", "train", "valid", "test"),
    "build-dataset": ("src", "source", "size", "square", "limit", "workers"),  # and out: OUT/dataset (srgan.pipeline)
    "train-gen": ("size", "bs", "epochs", "stages", "checkpoint_every", "preview_items", "num_workers",
                  "precision", "pretrained", "options", "loss", "lr"),  # the last three: pinned, see below
    "train-critic": ("size", "bs", "epochs", "checkpoint_every", "num_workers", "precision", "pretrained"),
    "train-gan": ("size", "bs", "epochs", "iters", "checkpoint_every", "preview_items", "num_workers", "precision",
                  "pretrained", "gen_first"),
    "evaluate": ("limit", "grids", "lpips", "precision"),
}


def critic_min_size(arch: str | None, options: dict[str, Any] | None) -> int:
    """The smallest input the critic takes (0 when there is no critic or its arch is unknown)."""
    from srgan.critics import min_input_size

    if not arch:
        return 0
    try:
        return min_input_size(arch, **(options or {}))
    except (KeyError, TypeError):
        return 0


def smoke_overrides(stage: str, cfg: BaseModel, *, critic_min: int = 0, crops: bool = False) -> BaseModel:
    """`cfg` (a validated stage config) shrunk to a smoke run; only the keys of SMOKE_KEYS change:

    - sample-crops: size → 64, train/valid/test → 4/1/2 crops.
    - build-dataset: src/source → `samples` (the photos installed packages ship; kept as the crops folder when
      the pipeline cuts sample crops), size (HR short side) → 64 (square → 64 where the recipe squashes its HR),
      limit → 4 photos (not with crops), workers → 1. preset, scale, split and seed stay the recipe's; out is
      OUT/dataset (never data/).
    - train-gen, train-critic, train-gan: size → 32, or the critic's minimum input rounded up to a multiple
      of 32 (train-critic; train-gan's `critic_arch`, else `critic_min`: the input size of the critic that
      the pipeline's train-critic makes);
      bs → 2; epochs → 1; each of `stages` → that size, bs 2, 1 epoch (its lr and the stage count kept);
      checkpoint_every → 1 batch where set; preview_items → 1; num_workers → 0; precision → fp32;
      pretrained → false (as `--no-pretrained`).
    - train-gan: iters → n_crit + n_gen with the fixed switcher (the critic and the generator each train at
      least once), 2 with per-batch (both train on every step), 4 with adaptive; adaptive switching moves on to
      the generator only once the critic's loss is under its threshold, which a critic at chance (BCE 0.69 >
      0.65) may never reach in 4 steps, so gen_first → true there: the first step trains the generator (its
      adversarial term, the content/adversarial weighting and the EMA update all run), then the critic.
      checkpoint_every → iters (one checkpoint, at the end).
    - train-gen (a config with `resolved()`): options, loss and lr (also each stage's) are pinned to the values
      the recipe resolves them to with its weights (e.g. `residual: false` for an ImageNet U-Net), since
      their defaults follow `pretrained`. The frozen-encoder phases of a pretrained U-Net do not run: train-gen
      freezes only an ImageNet encoder.
    - evaluate: limit → 2 pairs, grids → 1, lpips → false, precision → fp32.

    The run-wide overrides (`--precision`, `--device`) are applied after this by the caller, so they win.
    """
    fields = type(cfg).model_fields
    values = cfg.model_dump()
    changes: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in fields and key in SMOKE_KEYS.get(stage, ()):
            changes[key] = value

    if stage == "sample-crops":
        put("size", HR_SIZE)
        for split, n in CROPS.items():
            put(split, min(values.get(split, n), n))
    elif stage == "build-dataset":
        if not crops:
            put("src", "samples")
            put("source", "samples")
            put("limit", ITEMS)
        put("square" if values.get("square") else "size", HR_SIZE)  # a squashed HR stays square, 64 x 64
        put("workers", 1)
    elif stage == "evaluate":
        put("limit", min(values.get("limit") or EVAL_ITEMS, EVAL_ITEMS))
        put("grids", min(values.get("grids", 1), 1))
        put("lpips", False)
        put("precision", "fp32")
    else:  # a training stage
        resolve = getattr(cfg, "resolved", None)
        if callable(resolve) and values.get("pretrained"):
            # defaults that follow `pretrained` (train-gen: residual, loss, lr) are pinned to what the recipe
            # resolves them to, so switching the weights off leaves the architecture, loss and rates alone
            recipe = resolve().model_dump()
            for key in ("options", "loss", "lr", "stages"):
                if key in recipe and recipe[key] != values.get(key):
                    values[key] = changes[key] = recipe[key]
        need = 0  # the critic's smallest input, where this stage trains one
        if stage == "train-critic":
            need = critic_min_size(values.get("arch"), values.get("options"))
        elif "critic_arch" in fields:  # train-gan: a new critic, or the one train-critic made (critic_min)
            need = (critic_min_size(values["critic_arch"], values.get("critic_options")) if values["critic_arch"]
                    else critic_min)
        size = -(-max(CROP, need) // 32) * 32
        if values.get("stages"):
            put("stages", [{**st, "size": size, "bs": BATCH, "epochs": 1} for st in values["stages"]])
        else:
            put("size", size)
            put("bs", BATCH)
            put("epochs", 1)
        put("preview_items", min(values.get("preview_items", 1), 1))
        put("num_workers", 0)
        put("precision", "fp32")
        put("pretrained", False)
        if "iters" in fields:
            switching = values.get("switching")
            iters = (values.get("n_crit", 1) + values.get("n_gen", 1) if switching == "fixed"
                     else GAN_ITERS.get(switching, 2))
            put("iters", iters)
            put("checkpoint_every", iters)
            if switching == "adaptive":
                put("gen_first", True)
        elif values.get("checkpoint_every") is not None:
            put("checkpoint_every", 1)
    try:
        return type(cfg).model_validate({**values, **changes})
    except ValidationError as exc:  # a config class whose limits a smoke size breaks: name the stage
        raise ConfigError(f"stage {stage} (--smoke): {exc}") from None

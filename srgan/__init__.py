"""srgan: super-resolution and restoration models trained on datasets built by crappify, and run on photos.

Layers, bottom first; data flows down them: a module imports only modules of its own layer or a lower one
(`SRGAN_LAYERS` in `tests/test_layering.py`, the one definition, checks it, imports inside functions included):

- bottom: `runtime` (device, the one precision policy, the options every training stage shares, SIGTERM),
  `normalize` (ImageNet statistics and the `Normalizer`), `upsample` (the one bicubic resize), `loader` (the
  seeded fastai DataLoader), `weights` (reading pretrained weights safely), `distributed`, `callbacks` (the fastai
  callbacks the stages share);
- models: `generators` (generator architectures and their input contract, `model_input`), `critics`, `losses`,
  `adversarial`, `checkpoint` (generator and critic files, resumable checkpoints);
- data: `data` (paired LR/HR crops from a built dataset, degraded offline or online);
- inference: `inference` (a generator file run tile by tile);
- running: `predict`, `enhance`, `evaluate`, `export`;
- training: `train_gen` (train-gen), `train_critic` (train-critic), `train_gan` and `gan_loop` (train-gan);
- pipeline: `pipeline` (the whole chain from one YAML file), with `smoke`, `inspection` and `demo`.

`srgan` may import `crappify` (never its command layer, `crappify.cli`), never the other way round, except for
`crappify.cli`, the commands on top of both. Importing `crappify` first (here) loads OpenCV through
`crappify.opencv`, with its decoder pixel cap set before the library reads it.
"""

import crappify  # noqa: F401

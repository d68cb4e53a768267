"""srgan: super-resolution and restoration models trained on datasets built by crappify, and run on photos.

Layers, bottom first; data flows down them: the bottom imports no data or stage module, the models no data or
stage module, the data no stage (`tests/srgan/test_structure.py` checks it, imports inside functions included):

- bottom: `runtime` (device, the one precision policy, the options every training stage shares, SIGTERM),
  `normalize` (ImageNet statistics and the `Normalizer`), `callbacks` (the fastai callbacks the stages share),
  `checkpoint` (generator and critic files, resumable checkpoints), `upsample` (the one bicubic resize),
  `loader` (the seeded fastai DataLoader), `weights` (reading pretrained weights safely), `distributed`;
- models: `models` (generators and their input contract, `model_input`), `critics`, `losses`, `adversarial`;
- data: `data` (paired LR/HR crops from a built dataset, degraded offline or online);
- stages: `train` (train-gen), `critic` (train-critic), `gan` (train-gan); `inference` (tiled inference) and
  what runs it — `predict`, `enhance`, `evaluate`, `export`; `pipeline` (the whole chain from one YAML file),
  with `smoke`, `inspection` and `demo`.

`srgan` may import `crappify` (never its command layer, `crappify.cli`), never the other way round, except for
`crappify.cli`, the commands on top of both. Importing `crappify` first (here) loads OpenCV through
`crappify.opencv`, with its decoder pixel cap set before the library reads it.
"""

import crappify  # noqa: F401

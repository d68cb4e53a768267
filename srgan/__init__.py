"""srgan: generator/critic models, losses, training and inference on datasets built by crappify.

Filled by later work (train-gen, train-critic, train-gan, enhance, evaluate); `srgan` may import
`crappify`, never the other way round.
"""

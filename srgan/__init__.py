"""srgan: generator/critic models, losses, training and inference on datasets built by crappify.

`srgan` may import `crappify`, never the other way round. Importing `crappify` first (here) loads OpenCV
through `crappify.opencv`, with its decoder pixel cap set before the library reads it.
"""

import crappify  # noqa: F401

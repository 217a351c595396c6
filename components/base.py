"""What every component shares: the image it runs in, built from the repository's root Dockerfile.

`HIVLP_IMAGE` is read from the environment at compile time (the compiled YAML pins it), default the
release tag. The image already has the locked `kfp`, so components skip KFP's start-up
`pip install kfp` (which also lets them start on clusters without internet access).
"""

import functools
import os

from kfp import dsl

from hivlp import __version__

HIVLP_IMAGE = os.environ.get("HIVLP_IMAGE", f"ghcr.io/hivlp/hivlp:{__version__}")

hivlp_component = functools.partial(dsl.component, base_image=HIVLP_IMAGE, install_kfp_package=False)

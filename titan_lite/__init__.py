"""titan_lite: a compact PyTorch-native trainer for Llama 3 models."""

import os

__version__ = "0.1.0"

# Inductor's cache folder as the user set it, or None. Read before any submodule imports torch:
# importing torch._dynamo writes Inductor's default folder into the environment.
USER_INDUCTOR_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

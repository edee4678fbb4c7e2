"""titan_lite: a compact PyTorch-native trainer for Llama 3 models."""

__version__ = "0.1.0"

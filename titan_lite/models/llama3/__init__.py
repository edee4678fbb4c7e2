"""Llama 3 model family."""

from titan_lite.models.llama3.args import FAMILIES, FLAVORS, ModelArgs, RopeScaling
from titan_lite.models.llama3.model import Transformer

__all__ = ["FAMILIES", "FLAVORS", "ModelArgs", "RopeScaling", "Transformer"]

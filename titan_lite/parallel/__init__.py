"""Parallelisms, one file per concern; each changes a model in place or wraps it."""

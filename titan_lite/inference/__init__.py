"""Running a model for answers: batched sampling with a KV cache (``generation``) and the
lm-evaluation-harness adapter (``harness``); the commands are ``python -m titan_lite.generate``,
``.predict`` and ``.evaluate``."""

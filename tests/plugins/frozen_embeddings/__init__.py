"""A method family that lives only in the tests: ReLoRA with the input embeddings frozen.

It is written as one folder that works in either place: here, imported by the launcher `tests/dist/frozen_embeddings.py`
(a plug-in), or copied into `relora_dist/methods/`, where it registers itself with nothing else changed
(tests/test_method_interface.py checks both). Its imports are the method interface and the relora family's public
names only, as docs/ARCHITECTURE.md's layer table asks of every family.
"""

from .method import FrozenEmbeddingsReLoRA

__all__ = ["FrozenEmbeddingsReLoRA"]

"""Readers: one module per source kind, each yielding :class:`converter.descriptors.Checkpoint`.

``torchfile`` reads a torch pickle (zip or legacy container, restricted unpickler).
"""

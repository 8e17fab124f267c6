"""Ties a model *declares*: what its config and class tie, whatever the files hold.

Saving each shard with ``torch.save`` separately breaks shared storage: a tied
embedding lands in two files as two copies. The model folder still says they are
one tensor: ``config.json`` names the architecture, and the transformers class
ties the weights when it is built. We build it on the ``meta`` device (no memory,
no weights, no code from the folder: only classes transformers ships, no
``trust_remote_code``) and read the tie groups off parameter identity.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path


def _architecture(folder: Path) -> tuple[str | None, bool]:
    """The first ``architectures`` entry of ``config.json`` and ``tie_word_embeddings``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if not isinstance(config, dict):
        return None, False
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    return (name if isinstance(name, str) else None), bool(config.get("tie_word_embeddings", True))


def declared_ties(folder: str | Path) -> list[list[str]]:
    """Groups of parameter/buffer names the model class of ``folder`` ties together.

    Empty when the folder has no usable ``config.json`` or transformers does not
    know the architecture. The first name of a group is the one the module
    registers first (the input embedding before ``lm_head``).

    Example:
        >>> declared_ties("llama-folder")  # doctest: +SKIP
        [['model.embed_tokens.weight', 'lm_head.weight']]
    """
    folder = Path(folder)
    architecture, _ = _architecture(folder)
    if architecture is None:
        return []
    import torch  # lazily: only folders with a config pay for it
    import transformers

    model_class = getattr(transformers, architecture, None)
    if not isinstance(model_class, type) or not hasattr(model_class, "config_class"):
        return []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = model_class(config)
    except Exception as exc:  # an odd config must not stop the conversion: no declared ties then
        logging.getLogger(__name__).info("could not build %s on meta: %s", architecture, exc)
        return []
    finally:
        transformers.logging.set_verbosity(verbosity)
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]

"""Compare the ties read from transformers' source with those of the class built on meta.

    python scripts/check_static_ties.py            # every architecture transformers ships
    python scripts/check_static_ties.py llama gpt2 # some model types

For each model type: its config class with default values, and each model class
of its modeling module built on the ``meta`` device. ``converter.static_ties``
must either answer None (undecided: tiesafe builds the class) or give the same
groups as the built model (parameters and persistent buffers sharing one tensor).
Prints the counts and every disagreement; exits 1 if there is one.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from converter.static_ties import static_ties


def built_groups(model: torch.nn.Module) -> set[frozenset[str]]:
    persistent = set(model.state_dict(keep_vars=True))
    groups: dict[int, set[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in persistent:
            groups.setdefault(id(tensor), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def main(argv: list[str]) -> int:
    transformers.logging.set_verbosity(logging.ERROR)
    warnings.simplefilter("ignore")
    types = argv or sorted(CONFIG_MAPPING.keys())
    decided = undecided = unbuildable = 0
    disagreements: list[str] = []
    for model_type in types:
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:
            unbuildable += 1
            continue
        module_name = f"transformers.models.{model_type.replace('-', '_')}.modeling_{model_type.replace('-', '_')}"
        try:
            module = __import__(module_name, fromlist=["_"])
        except Exception:
            unbuildable += 1
            continue
        for name in dir(module):
            cls = getattr(module, name)
            if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                continue
            if cls.__module__ != module.__name__ or cls.config_class is not type(config) or "PreTrained" in name:
                continue
            for tie in (True, False):
                data = config.to_dict() | {"tie_word_embeddings": tie}
                answer = static_ties(data, name)
                if answer is None:
                    undecided += 1
                    continue
                try:
                    built_config = type(config).from_dict(data)
                    with torch.device("meta"):
                        model = cls(built_config)
                except Exception:
                    unbuildable += 1
                    continue
                decided += 1
                expected = built_groups(model)
                got = {frozenset(g) for g in answer}
                if got != expected:
                    disagreements.append(
                        f"{model_type} {name} tie={tie}: source {sorted(map(sorted, got))} "
                        f"built {sorted(map(sorted, expected))}"
                    )
                    print(disagreements[-1], flush=True)
    print(
        f"decided from the source: {decided}; undecided (built): {undecided}; not buildable here: {unbuildable}; "
        f"disagreements: {len(disagreements)}"
    )
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

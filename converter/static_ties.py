"""The ties a transformers architecture declares, read from transformers' source without importing it.

Building the class on the ``meta`` device (declared.py) is exact, but it imports
torch and transformers: 2-4 s and ~300 MiB, more than converting a 3 GB model.
For the usual shape of model code the answer is written in the source::

    class LlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

applied by ``PreTrainedModel.tie_weights`` when the config's ``tie_word_embeddings``
holds. This module reads exactly that with :mod:`ast` and answers only when nothing
else in the model's module could tie or untie weights (module sharing in an
``__init__``, an overridden ``tie_weights``, ties computed at run time, sub-models
from other modules, a config class that rewrites ``tie_word_embeddings``, nested
sub-configs, regex patterns). Anything else returns None and the caller builds the
class. ``scripts/check_static_ties.py`` compares both answers over every
architecture transformers ships.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

# Plain parameter names, as transformers' own short-cut accepts them without expansion.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+\.(weight|bias)$")
# Bases whose ``_tied_weights_keys`` is None or absent.
_NEUTRAL_BASES = {"PreTrainedModel", "GenerationMixin", "nn.Module", "Module", "object"}
# Calls whose result is never a module.
_HARMLESS_NAMES = {
    "super", "int", "float", "bool", "str", "len", "range", "list", "dict", "tuple", "set",
    "min", "max", "getattr", "hasattr", "isinstance", "enumerate", "zip", "sum", "any", "all",
}  # fmt: skip
# Methods that tie (or untie) weights in their own way when a model overrides them.
_TYING_METHODS = {"tie_weights", "_tie_weights", "_tie_or_clone_weights", "_tie_embedding_weights"}


class _Undecided(Exception):
    """The source does not settle the answer: build the class instead."""


def static_ties(config: dict[str, object], architecture: str) -> list[list[str]] | None:
    """Groups of names ``architecture`` ties under ``config`` (config.json's content), or None.

    None means "not decidable from the source": build the class to know.

    Example:
        >>> static_ties({"model_type": "llama", "tie_word_embeddings": True}, "LlamaForCausalLM")  # doctest: +SKIP
        [['model.embed_tokens.weight', 'lm_head.weight']]
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", model_type):
        return None
    if any(isinstance(value, dict) and "model_type" in value for value in config.values()):
        return None  # composite model: sub-models tie by their own configs
    package = transformers_root()
    if package is None:
        return None
    folder = package / "models" / model_type.replace("-", "_")
    name = folder.name
    try:
        mapping = _tied_mapping(folder / f"modeling_{name}.py", architecture)
        if mapping and not _ties_word_embeddings(folder / f"configuration_{name}.py", model_type, config):
            mapping = {}
    except _Undecided:
        return None
    return _groups(mapping)


@functools.cache
def transformers_root() -> Path | None:
    """The installed transformers package's folder, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec("transformers")  # finds the package; runs none of it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        raise _Undecided from None


def _tied_mapping(modeling: Path, architecture: str) -> dict[str, str]:
    """``_tied_weights_keys`` of ``architecture`` (target -> source), after the module passed every check."""
    module = _parse(modeling)
    classes = {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}
    if architecture not in classes:
        raise _Undecided
    _refuse_dynamic_tying(module)
    mapping = _mapping(classes, architecture) or {}
    _check_submodels(classes, architecture, set())
    return mapping


def _refuse_dynamic_tying(module: ast.Module) -> None:
    assignments = [node for node in ast.walk(module) if isinstance(node, (ast.Assign, ast.AnnAssign))]
    # Attributes some code sets from a call (a layer, a module list...): what sharing would share.
    built = {
        target.attr
        for node in assignments
        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func) not in _HARMLESS_NAMES
        for target in _targets(node)
        if _self_chain(target)
        and isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)  # `self.x = ...`
    }
    known = {
        target.attr
        for node in assignments
        for target in _targets(node)
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    for node in ast.walk(module):
        if isinstance(node, ast.FunctionDef) and node.name in _TYING_METHODS:
            raise _Undecided  # the model ties in code of its own
    constructors = [node for node in ast.walk(module) if isinstance(node, ast.FunctionDef) and node.name == "__init__"]
    for node in (call for init in constructors for call in ast.walk(init) if isinstance(call, ast.Call)):
        if ast.unparse(node.func) in _HARMLESS_NAMES:
            continue
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            if _self_chain(argument) in built:
                raise _Undecided  # `Layer(self.embed)`: a module handed to another, which may keep it
    for node in assignments:
        for target in _targets(node):
            if isinstance(target, ast.Attribute) and target.attr == "_tied_weights_keys":
                raise _Undecided  # ties computed at run time
            shared = _self_chain(node.value) if node.value is not None and _self_chain(target) else None
            if shared is not None and shared != "config" and (shared in built or shared not in known):
                raise _Undecided  # `self.a = self.b`: a module or parameter shared by assignment


def _targets(node: ast.Assign | ast.AnnAssign) -> list[ast.expr]:
    return node.targets if isinstance(node, ast.Assign) else [node.target]


def _self_chain(node: ast.expr | None) -> str | None:
    """The first attribute of a chain ``self.a.b[0]...`` (no calls), None for anything else."""
    first = None
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            first = node.attr
        node = node.value
    return first if isinstance(node, ast.Name) and node.id == "self" else None


def _looks_like_a_model(name: str) -> bool:
    """A class from another module that may be a ``PreTrainedModel`` with ties of its own."""
    last = name.rsplit(".", 1)[-1]
    return last.endswith("Model") or "For" in last or last.startswith("Auto")


def _mapping(classes: dict[str, ast.ClassDef], name: str) -> dict[str, str] | None:
    """The ``_tied_weights_keys`` class ``name`` has, by its own body or the first base
    (depth first, as the MRO of these single-line hierarchies) defining it; None if none does."""
    found = _own_mapping(classes[name])
    if found is not None:
        return found
    for base in _module_bases(classes, name):
        mapping = _mapping(classes, base)
        if mapping is not None:
            return mapping
    return None


def _module_bases(classes: dict[str, ast.ClassDef], name: str) -> Iterator[str]:
    """The bases of ``name`` defined in this module, in order; a model class from another
    module (its ties and its ``__init__`` are not read here) leaves the answer undecided."""
    for base in classes[name].bases:
        base_name = ast.unparse(base)
        if base_name in classes:
            yield base_name
        elif base_name not in _NEUTRAL_BASES and _looks_like_a_model(base_name):
            raise _Undecided


def _own_mapping(node: ast.ClassDef) -> dict[str, str] | None:
    """The class body's own ``_tied_weights_keys``: a dict of plain names, ``{}`` for None, None if unset."""
    for statement in node.body:
        if isinstance(statement, ast.Assign):
            names = [t.id for t in statement.targets if isinstance(t, ast.Name)]
            value: ast.expr | None = statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names, value = [statement.target.id], statement.value
        else:
            continue
        if "_tied_weights_keys" not in names:
            continue
        if value is None or (isinstance(value, ast.Constant) and value.value is None):
            return {}
        if not isinstance(value, ast.Dict):
            raise _Undecided
        mapping: dict[str, str] = {}
        for key, item in zip(value.keys, value.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(item, ast.Constant)):
                raise _Undecided
            target, source = key.value, item.value
            if not (isinstance(target, str) and isinstance(source, str)):
                raise _Undecided
            if not (_PLAIN_NAME.match(target) and _PLAIN_NAME.match(source)):
                raise _Undecided  # a regex or a module name: transformers expands it against the built model
            mapping[target] = source
        return mapping
    return None


def _check_submodels(classes: dict[str, ast.ClassDef], name: str, seen: set[str]) -> None:
    """No class that the ``__init__`` of ``name`` (or of its bases, or of what they build)
    builds is a model with ties of its own: transformers ties sub-models too."""
    if name in seen:
        return
    seen.add(name)
    for base in _module_bases(classes, name):
        _check_submodels(classes, base, seen)
    for statement in classes[name].body:
        if not (isinstance(statement, ast.FunctionDef) and statement.name == "__init__"):
            continue
        for node in ast.walk(statement):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            if called in classes:
                if called not in seen and _mapping(classes, called):
                    raise _Undecided  # a sub-model that ties weights of its own
                _check_submodels(classes, called, seen)
            elif _looks_like_a_model(called) or "from_config" in called or "from_pretrained" in called:
                raise _Undecided  # a model from elsewhere may tie


def _ties_word_embeddings(configuration: Path, model_type: str, config: dict[str, object]) -> bool:
    """``tie_word_embeddings`` as the config class will hold it: the file's value, else the class default."""
    module = _parse(configuration)
    owners = [
        node
        for node in module.body
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(s, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "model_type" for t in s.targets)
            and isinstance(s.value, ast.Constant)
            and s.value.value == model_type
            for s in node.body
        )
    ]
    if len(owners) != 1:
        raise _Undecided
    default = False  # PreTrainedConfig has no such field: getattr(config, ..., False) in transformers
    declarations = 0
    for statement in owners[0].body:
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and statement.target.id == "tie_word_embeddings"
        ):
            if not (isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, bool)):
                raise _Undecided
            default, declarations = statement.value.value, declarations + 1
    mentions = sum(
        1
        for node in ast.walk(module)
        if (isinstance(node, ast.Name) and node.id == "tie_word_embeddings")
        or (isinstance(node, ast.Attribute) and node.attr == "tie_word_embeddings")
        or (isinstance(node, ast.Constant) and node.value == "tie_word_embeddings")
    )
    if mentions != declarations:
        raise _Undecided  # the config class rewrites or derives it
    value = config.get("tie_word_embeddings", default)
    if not isinstance(value, bool):
        raise _Undecided
    return value


def _groups(mapping: dict[str, str]) -> list[list[str]]:
    """Target -> source pairs as groups of one tensor's names, the source first."""
    root: dict[str, str] = {}

    def find(name: str) -> str:
        while root.get(name, name) != name:
            name = root[name]
        return name

    for target, source in mapping.items():
        root.setdefault(source, source)
        root[find(target)] = find(source)
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys([*mapping.values(), *mapping]):
        groups.setdefault(find(name), []).append(name)
    return [names for names in groups.values() if len(names) > 1]

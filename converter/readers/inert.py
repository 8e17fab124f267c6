"""Inert placeholders for the globals a weights file does not need.

A training checkpoint names classes of its own code and of other libraries
(``argparse.Namespace``, ``omegaconf.dictconfig.DictConfig``, ``numpy.dtype``). We
never import them. The unpickler hands out, for each such global, a class of *ours*
that carries only the global's name; whatever the pickle then does with it — call it
(``REDUCE``, ``INST``, ``OBJ``), instantiate it (``NEWOBJ``), set its state
(``BUILD``), append or set items (``APPEND(S)``, ``SETITEM(S)``, ``ADDITEMS``), call the
result — yields or updates an :class:`InertObject` that records references to the
plain data it was given. No method here calls, hashes, compares or converts what it
receives, so nothing the file supplies can run, and memory stays what the unpickler
already built.
"""

from __future__ import annotations

from typing import Any, ClassVar

# numpy's dtype codes, as numpy.dtype("f8") pickles them: enough to name a scalar's type.
_NUMPY_CODES = {
    "b1": "bool",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "c8": "complex64",
    "c16": "complex128",
}


class InertObject:
    """What a foreign global becomes: its name and the plain data the pickle gave it.

    Subclasses made by :func:`inert_class` stand for the global itself (``NEWOBJ``
    needs a class); instances stand for what calling it would have returned.

    Example:
        >>> Namespace = inert_class("argparse.Namespace")
        >>> args = Namespace(lr=0.1)
        >>> args.origin, args.kwargs
        ('argparse.Namespace', {'lr': 0.1})
    """

    __slots__ = ("args", "items", "kwargs", "origin", "state")
    global_name: ClassVar[str] = "?"
    origin: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        return cls._made(cls.global_name, args, kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded everything; a call builds nothing else

    @classmethod
    def _made(cls, origin: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> InertObject:
        obj = object.__new__(InertObject)
        obj.origin, obj.args, obj.kwargs, obj.state, obj.items = origin, args, kwargs, None, []
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> InertObject:
        return InertObject._made(f"{self.origin}(...)", args, kwargs)

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.state = state

    def append(self, item: Any) -> None:  # APPEND on a list-like object
        self.items.append(item)

    def extend(self, items: Any) -> None:  # APPENDS
        self.items.extend(items if isinstance(items, list) else [])

    def add(self, item: Any) -> None:  # ADDITEMS on a set-like object
        self.items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict-like object
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"

    def children(self) -> list[Any]:
        """Everything this object holds references to, for finding tensors inside it."""
        return [*self.args, *self.kwargs.values(), self.state, *self.items]


def inert_class(global_name: str) -> type[InertObject]:
    """A class of ours standing for ``global_name``; calling or instantiating it records the call.

    Example:
        >>> inert_class("omegaconf.dictconfig.DictConfig").global_name
        'omegaconf.dictconfig.DictConfig'
    """
    return type("InertGlobal", (InertObject,), {"__slots__": (), "global_name": global_name})


def describe(value: Any) -> str:
    """A short type description of an inert value for reports (``numpy.float64``, ``argparse.Namespace``).

    Example:
        >>> describe(inert_class("argparse.Namespace")())
        'argparse.Namespace'
    """
    if isinstance(value, type) and issubclass(value, InertObject):
        return f"class {value.global_name}"
    if not isinstance(value, InertObject):
        return type(value).__name__
    origin, args = value.origin, value.args
    if origin == "copyreg._reconstructor" and args and isinstance(args[0], type) and issubclass(args[0], InertObject):
        return args[0].global_name  # protocol 0/1: "an instance of class args[0]"
    if origin.endswith("multiarray.scalar") and args and isinstance(args[0], InertObject):
        code = args[0].args[0] if args[0].args else None
        return f"numpy.{_NUMPY_CODES.get(code, 'scalar')}" if isinstance(code, str) else "numpy scalar"
    if origin.endswith("multiarray._reconstruct") and args and isinstance(args[0], type):
        return str(getattr(args[0], "global_name", "numpy.ndarray"))
    return origin

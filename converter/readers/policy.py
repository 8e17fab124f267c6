"""Which globals a pickle may name: tensor machinery, inert objects, or a refusal.

Training checkpoints hold more than weights: ``argparse.Namespace`` arguments
(fairseq), OmegaConf configs (Lightning, NeMo), numpy scalars, DeepSpeed enums. None
of those is ever imported or called. A global that is not tensor machinery becomes an
:mod:`inert <.inert>` placeholder that only records its name and the plain data it was
given, so the weights beside it can still be converted.

*Why inert objects are safe even for a global missing from the list below*: the
unpickler never imports a module and never calls anything the file names. A
placeholder is an instance of a class of ours whose methods store references and
return more placeholders; the file cannot reach a function of the interpreter through
it. The list below is therefore not what keeps code from running — that holds for
every global — but a verdict on intent: a weights file that names ``os.system`` was
written to run code, and converting the rest of it would hide that. It is refused
whole, whatever else it holds.

The list is at least as strict as picklescan's and the Hub's pickle scanner's
(``_unsafe_globals``): every module they refuse wholly is refused wholly here, and
where they refuse single names (``builtins.eval``, ``operator.attrgetter``,
``functools.partial``, ``torch.serialization.load``) the whole module is refused here.
"""

from __future__ import annotations

from typing import Literal

Verdict = Literal["inert", "dangerous"]

# Modules (and every module below them) whose globals run code, reach the file system,
# processes, the network or the import machinery, or load another pickle.
DANGEROUS_MODULES: dict[str, str] = {
    # processes and the interpreter
    "os": "processes and files",
    "posix": "processes and files",
    "nt": "processes and files",
    "subprocess": "processes",
    "_posixsubprocess": "processes",
    "commands": "processes (Python 2)",
    "popen2": "processes (Python 2)",
    "pty": "processes",
    "signal": "processes",
    "multiprocessing": "processes",
    "concurrent": "threads and processes",
    "threading": "threads",
    "_thread": "threads",
    "sys": "the interpreter",
    "gc": "the interpreter",
    "ctypes": "native code",
    "_ctypes": "native code",
    "cffi": "native code",
    "_winapi": "processes (Windows)",
    "winreg": "the registry (Windows)",
    "msvcrt": "the console (Windows)",
    # running code
    "builtins": "eval, exec, getattr, open and __import__",
    "__builtin__": "eval, exec, getattr, open and __import__ (Python 2)",
    "code": "running code",
    "codeop": "compiling code",
    "runpy": "running code",
    "timeit": "running code",
    "cProfile": "running code",
    "profile": "running code",
    "trace": "running code",
    "pdb": "running code",
    "bdb": "running code",
    "doctest": "running code",
    "pydoc": "importing modules and running commands",
    "idlelib": "running code",
    "lib2to3": "loading pickles",
    "operator": "attribute and method calls (attrgetter, methodcaller)",
    "functools": "calls (partial, reduce)",
    "copyreg": "the pickle registry (extension codes)",
    "logging.config": "logging.config.listen runs received code",
    "asyncio": "processes and the network",
    # the import machinery
    "importlib": "importing modules",
    "imp": "importing modules",
    "zipimport": "importing modules",
    "pkgutil": "importing modules",
    "site": "importing modules",
    "ensurepip": "installing packages",
    "pip": "installing packages",
    "venv": "creating environments",
    "distutils": "files and building code",
    "setuptools": "files and building code",
    # other pickles and serialisers (a pickle inside the pickle)
    "pickle": "loading another pickle",
    "_pickle": "loading another pickle",
    "cPickle": "loading another pickle",
    "pickletools": "pickles",
    "marshal": "loading code objects",
    "shelve": "loading pickles",
    "dbm": "files",
    "dill": "loading pickles and code",
    "cloudpickle": "loading pickles and code",
    "joblib": "loading pickles",
    "yaml": "yaml.load runs constructors",
    "jinja2": "templates run code",
    # files
    "io": "files",
    "_io": "files",
    "shutil": "files",
    "tempfile": "files",
    "glob": "files",
    "fileinput": "files",
    "sqlite3": "files",
    "tarfile": "files",
    "zipfile": "files",
    # the network
    "socket": "the network",
    "_socket": "the network",
    "ssl": "the network",
    "select": "the network",
    "selectors": "the network",
    "http": "the network",
    "httplib": "the network",
    "urllib": "the network",
    "urllib2": "the network",
    "urllib3": "the network",
    "ftplib": "the network",
    "smtplib": "the network",
    "poplib": "the network",
    "imaplib": "the network",
    "telnetlib": "the network",
    "xmlrpc": "the network",
    "webbrowser": "opening programs",
    "requests": "the network",
    "httpx": "the network",
    "aiohttp": "the network",
    "paramiko": "remote commands",
    "fabric": "remote commands",
    "pexpect": "processes",
    "IPython": "running code",
    # torch: loading, compiling, operators, native code
    "torch.serialization": "torch.load runs another pickle",
    "torch.hub": "downloading and running code",
    "torch.jit": "TorchScript code",
    "torch._C": "native code",
    "torch.ops": "native operators",
    "torch._ops": "native operators",
    "torch.classes": "native classes",
    "torch.library": "registering operators",
    "torch.package": "packaged code",
    "torch.fx": "generated code",
    "torch._dynamo": "compiled code",
    "torch._inductor": "compiled code and compilers",
    "torch.export": "exported programs",
    "torch.compiler": "compiled code",
    "torch.multiprocessing": "processes",
    "torch.distributed.rpc": "remote calls",
    "torch.distributed.elastic": "processes",
    "torch.distributed.launcher": "processes",
    "torch.distributed.run": "processes",
    "torch.distributed.launch": "processes",
    "torch.utils.cpp_extension": "building native code",
    "torch.utils.collect_env": "running commands",
    "torch.utils.bottleneck": "running code",
    "torch.utils._config_module": "loading pickles",
    "torch.utils.data.datapipes": "loading pickles and running code",
    "torch._weights_only_unpickler": "pickles",
    # numpy / pandas entry points that load files or run strings
    "numpy.f2py": "running strings as code",
    "numpy.testing": "running strings as code",
    "numpy.distutils": "building code",
    "numpy.ctypeslib": "native code",
    "numpy.lib.npyio": "loading pickles",
    "pandas.io": "loading pickles",
}

# Single names refused in modules whose other globals are harmless data types.
DANGEROUS_NAMES: dict[tuple[str, str], str] = {
    ("torch", "load"): "torch.load runs another pickle",
    ("torch", "save"): "writes files",
    ("torch", "compile"): "compiles code",
    ("torch.storage", "_load_from_bytes"): "torch.load runs another pickle",
    ("numpy", "load"): "loading pickles",
    ("numpy", "loads"): "loading pickles",
    ("numpy", "fromfile"): "files",
    ("numpy", "memmap"): "files",
    ("pandas", "read_pickle"): "loading pickles",
    ("numpy.core.multiarray", "_load_from_filelike"): "files",
    # types: the data classes (SimpleNamespace) are harmless; these make code and functions.
    ("types", "FunctionType"): "makes functions from code",
    ("types", "LambdaType"): "makes functions from code",
    ("types", "CodeType"): "makes code objects",
    ("types", "MethodType"): "binds methods",
    ("types", "ModuleType"): "makes modules",
    ("types", "new_class"): "makes classes",
    ("types", "CellType"): "makes closures",
}

# Builtins that only build plain values; every other builtin is refused (eval, getattr, ...).
PLAIN_BUILTINS = frozenset(
    {"set", "frozenset", "bytes", "bytearray", "complex", "range", "slice", "object"}
    | {"int", "float", "str", "bool", "list", "dict", "tuple"}
)


def dangerous_reason(module: str, name: str) -> str | None:
    """Why a global is refused outright, or ``None`` when it may stand as an inert object.

    ``module`` and ``name`` are as the pickle spells them after Python 2 names are
    mapped (``__builtin__`` -> ``builtins``). A qualified ``name`` (``A.b``, protocol
    4) is judged by its first part as well as in full.

    Example:
        >>> dangerous_reason("posix", "system")
        'processes and files'
        >>> dangerous_reason("argparse", "Namespace") is None
        True
    """
    if module in ("builtins", "__builtin__") and name in PLAIN_BUILTINS:
        return None
    if module == "copyreg" and name == "_reconstructor":
        return None  # protocol 0/1 spelling of "make an instance of class C": inert like C itself
    head = name.split(".", 1)[0]
    reason = DANGEROUS_NAMES.get((module, name)) or DANGEROUS_NAMES.get((module, head))
    if reason:
        return reason
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        reason = DANGEROUS_MODULES.get(".".join(parts[:end]))
        if reason:
            return reason
    if module == "torch" and head in ("jit", "hub", "ops", "classes", "package", "fx", "_C", "library"):
        return DANGEROUS_MODULES[f"torch.{head}"]
    return None

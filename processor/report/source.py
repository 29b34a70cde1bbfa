"""The source checkout: Python functions found with ``ast``, and production locations
mapped onto them.

A production location names a function (``shop.checkout.Checkout.apply_discount``, or
just ``checkout.apply_discount``), and often a file (``/app/shop/checkout.py``) and a
line. Mapping, in this order:

1. The file: the repository file whose path shares the longest run of trailing path
   components with the production path (``/app/shop/checkout.py`` -> ``shop/checkout.py``);
   a tie between files is no match.
2. The function in that file: the innermost ``def`` whose lines hold the production line,
   else the one whose dotted name ends with the production name.
3. Without a file (or when the file is not in the checkout): the function whose dotted
   name (module path + qualified name) ends, at a dot, with the longest part of the
   production name; a tie is no match.

A function is **instrumented** when it opens a span itself: it is decorated with
``@<anything>.start_as_current_span(...)`` (or ``start_span``), or its own body (not a
nested ``def``) has a ``with <anything>.start_as_current_span(...)`` /
``start_span(...)``, or sets the attribute ``"code.function.name"`` / ``"code.function"``
on a span in its own body (``.set_attribute("code.function.name", ...)``, or that key in a
dict given to ``.set_attributes`` or as a span's ``attributes``): merely naming the
attribute (a parser, a test) is not instrumenting. The span name, where it is a string
constant, is kept: a production location without code attributes is ``span:<name>``.
Test files (``is_test_path``) are not listed as "never seen in production".

>>> idx = SourceIndex.from_sources({"shop/checkout.py": '''
... class Checkout:
...     @tracer.start_as_current_span("checkout.total")
...     def total(self):
...         return 1
...     class Rules:
...         async def check(self):
...             pass
... '''})
>>> [(f.dotted, f.line, f.instrumented, f.span_names) for f in idx.functions]
[('shop.checkout.Checkout.total', 4, True, ('checkout.total',)), ('shop.checkout.Checkout.Rules.check', 7, False, ())]
>>> idx.map_path("/app/shop/checkout.py")
'shop/checkout.py'
>>> idx.resolve("checkout.Checkout.Rules.check").dotted
'shop.checkout.Checkout.Rules.check'
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

SPAN_CALLS = frozenset({"start_as_current_span", "start_span"})
CODE_NAME_ATTRIBUTES = frozenset({"code.function.name", "code.function"})
# Directories never read as part of the checkout.
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "env", "node_modules", "__pycache__",
                          "site-packages", ".tox", ".nox", ".mypy_cache", ".pytest_cache", "build", "dist"})
SPAN_MARK = "span:"


@dataclass(frozen=True)
class Function:
    path: str        # repository-relative, with /
    qualname: str    # within its module: Checkout.Rules.check
    line: int        # the def line (decorators excluded)
    end_line: int
    first_line: int  # the first decorator's line, or the def line
    is_async: bool = False
    instrumented: bool = False
    span_names: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return module_of(self.path)

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.qualname}" if self.module else self.qualname

    @property
    def name(self) -> str:
        return self.qualname.rpartition(".")[2]


def module_of(path: str) -> str:
    """``shop/checkout.py`` -> ``shop.checkout``; a package's ``__init__.py`` is the package."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _call_name(node: ast.AST) -> str:
    """The called attribute or name: ``tracer.start_as_current_span(...)`` -> that attribute."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _span_name(call: ast.AST) -> str | None:
    if isinstance(call, ast.Call):
        arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "name"), None)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def _own_nodes(fn: ast.AST):
    """The nodes of a function's own body, not those of functions or classes nested in it."""
    nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
    stack = [n for n in fn.body if not isinstance(n, nested)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, nested))


def _instrumentation(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[bool, tuple[str, ...]]:
    spans: list[str] = []
    found = False
    for dec in fn.decorator_list:
        if _call_name(dec) in SPAN_CALLS:
            found = True
            if (name := _span_name(dec)) is not None:
                spans.append(name)
    for node in _own_nodes(fn):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if _call_name(item.context_expr) in SPAN_CALLS:
                    found = True
                    if (name := _span_name(item.context_expr)) is not None:
                        spans.append(name)
        elif isinstance(node, ast.Call) and _sets_code_attribute(node):
            found = True
    return found, tuple(dict.fromkeys(spans))


def _sets_code_attribute(call: ast.Call) -> bool:
    """``x.set_attribute("code.function.name", ...)``, or the key in a dict literal given
    to ``x.set_attributes(...)`` or as ``attributes=`` of a span call."""
    name = _call_name(call)
    if name == "set_attribute":
        first = call.args[0] if call.args else None
        return isinstance(first, ast.Constant) and first.value in CODE_NAME_ATTRIBUTES
    if name == "set_attributes" or name in SPAN_CALLS:
        dicts = [a for a in call.args if isinstance(a, ast.Dict)]
        dicts += [k.value for k in call.keywords if k.arg == "attributes" and isinstance(k.value, ast.Dict)]
        return any(isinstance(k, ast.Constant) and k.value in CODE_NAME_ATTRIBUTES for d in dicts for k in d.keys)
    return False


def is_test_path(path: str) -> bool:
    """A test file by the usual layouts: under ``tests/``, ``test/`` or ``testing/``, or named
    ``test_*.py``, ``*_test.py`` or ``conftest.py``.

    >>> [is_test_path(p) for p in ("tests/test_a.py", "src/a_test.py", "conftest.py", "shop/cart.py")]
    [True, True, True, False]
    """
    parts = PurePosixPath(path).parts
    name = parts[-1] if parts else ""
    return (any(p in ("tests", "test", "testing") for p in parts[:-1]) or name.startswith("test_")
            or name.endswith("_test.py") or name == "conftest.py")


def functions_of(source: str, path: str) -> list[Function]:
    """Every def (methods, nested classes and functions, async defs) of one file, in order."""
    tree = ast.parse(source, filename=path)
    out: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + child.name
                instrumented, spans = _instrumentation(child)
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append(Function(path, qual, child.lineno, child.end_lineno or child.lineno, first,
                                    isinstance(child, ast.AsyncFunctionDef), instrumented, spans))
                visit(child, qual + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    out.sort(key=lambda f: (f.line, f.qualname))
    return out


def _suffix_len(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@dataclass
class SourceIndex:
    """The Python functions of a checkout, by file; built once per report."""
    functions: list[Function] = field(default_factory=list)
    files: list[str] = field(default_factory=list)            # every file of the checkout (relative)
    unparsed: dict[str, str] = field(default_factory=dict)    # .py files ast could not read -> why

    def __post_init__(self):
        self.by_path: dict[str, list[Function]] = {}
        for f in self.functions:
            self.by_path.setdefault(f.path, []).append(f)
        self._by_basename: dict[str, list[str]] = {}
        for p in self.files:
            self._by_basename.setdefault(PurePosixPath(p).name, []).append(p)
        self._by_name: dict[str, list[Function]] = {}
        for f in self.functions:
            self._by_name.setdefault(f.name, []).append(f)

    @classmethod
    def from_checkout(cls, root: str) -> "SourceIndex":
        files, functions, unparsed = [], [], {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                files.append(rel)
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(dirpath, name), "rb") as fh:
                            functions += functions_of(fh.read().decode("utf-8", "replace"), rel)
                    except (SyntaxError, ValueError, OSError) as e:
                        unparsed[rel] = str(e)
        return cls(functions, files, unparsed)

    @classmethod
    def from_sources(cls, sources: dict[str, str]) -> "SourceIndex":
        """From {relative path: source}, e.g. the files of a git revision."""
        functions, unparsed = [], {}
        for path, text in sorted(sources.items()):
            try:
                functions += functions_of(text, path)
            except (SyntaxError, ValueError) as e:
                unparsed[path] = str(e)
        return cls(functions, sorted(sources), unparsed)

    # --- mapping ------------------------------------------------------------------------------
    def map_path(self, production_path: str) -> str | None:
        """The checkout file a production ``code.file.path`` is, by the longest common tail
        of path components; None when no file has that name or two tie."""
        if not production_path:
            return None
        parts = tuple(p for p in production_path.replace("\\", "/").split("/") if p not in ("", "."))
        if not parts:
            return None
        best, best_len, tie = None, 0, False
        for cand in self._by_basename.get(parts[-1], ()):
            n = _suffix_len(parts, PurePosixPath(cand).parts)
            if n > best_len:
                best, best_len, tie = cand, n, False
            elif n == best_len:
                tie = True
        return None if tie else best

    def enclosing(self, path: str, line: int) -> Function | None:
        """The innermost function of ``path`` whose lines (decorators included) hold ``line``."""
        found = None
        for f in self.by_path.get(path, ()):
            if f.first_line <= line <= f.end_line and (found is None or f.first_line >= found.first_line):
                found = f
        return found

    def resolve(self, function: str, path: str | None = None) -> Function | None:
        """The function a production name means: the longest dotted-suffix match, in ``path``
        if given; None when nothing matches or two match equally well."""
        if not function or function.startswith(SPAN_MARK):
            return None
        wanted = tuple(function.replace(":", ".").split("."))
        cands = self.by_path.get(path, ()) if path else self._by_name.get(wanted[-1], ())
        best, best_len, tie = None, 0, False
        for f in cands:
            n = _suffix_len(wanted, tuple(f.dotted.split(".")))
            if n == 0:
                continue
            if n > best_len:
                best, best_len, tie = f, n, False
            elif n == best_len:
                tie = True
        return None if tie else best

    def locate(self, function: str, file: str = "", line: str | int = "") -> tuple[str | None, int | None, Function | None]:
        """(checkout path, line, function) for a production location; parts unknown are None."""
        path = self.map_path(file) if file else None
        try:
            lineno = int(line) if str(line).strip() else None
        except ValueError:
            lineno = None
        fn = None
        if path:
            if lineno is not None:
                fn = self.enclosing(path, lineno)
            if fn is None:
                fn = self.resolve(function, path)
        if fn is None and path is None:
            fn = self.resolve(function)
            if fn is not None:
                path = fn.path
        if path and lineno is None and fn is not None:
            lineno = fn.line
        return path, lineno, fn

    def instrumented(self) -> list[Function]:
        return [f for f in self.functions if f.instrumented]

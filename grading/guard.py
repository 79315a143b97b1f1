"""Make the course's own answers unreachable while a student's function runs under a check.

`forbid(references, torch_functions)` is a context manager. Inside it:
- every reference (a function, an `lru_cache`d function, or a class: all its own methods) raises
  `DelegationError` when called, whatever route led to it: `import`, `importlib.import_module`, an
  attribute of a module imported long before, a helper defined in another cell, an alias saved in
  a variable. It works on the function objects themselves (their `__code__` is swapped for one
  that raises), so every name bound to them sees the change;
- the modules that define them cannot be imported afresh or reloaded (`importlib.reload`,
  deleting them from `sys.modules`), which would make new, unguarded copies;
- the torch functions named in `torch_functions` (`"scaled_dot_product_attention"` in the
  explicit-attention exercises) raise too, through a `TorchFunctionMode`.
Each refused call is recorded, so a student's `try/except` around it does not hide it: `tripped()`
lists them. Out of scope: code copied by hand out of the course's source files (plagiarism, for
a person to judge), and C-level tricks in torch's internals.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch.overrides import TorchFunctionMode

_tripped: list[str] = []


class DelegationError(Exception):
    """Raised when a student's function calls the course's own answer to the exercise."""


def _trip(message: str) -> DelegationError:
    _tripped.append(message)
    return DelegationError(message)


def tripped(since: int = 0) -> list[str]:
    """The refused calls recorded since the `since`-th one (`len(tripped())` marks a start)."""
    return _tripped[since:]


def _raising_code(message: str, like):
    """A code object that raises DelegationError(message), with the free variables of `like` (a
    function's code can only be swapped for one with the same free variables)."""
    names = like.co_freevars
    uses = f"        {', '.join(names)},\n" if names else ""
    src = (f"def outer({', '.join(names)}):\n    def blocked(*args, **kwargs):\n{uses}"
           f"        raise __import__('grading.guard', fromlist=['_trip'])._trip({message!r})\n    return blocked\n")
    namespace: dict = {}
    exec(src, namespace)  # noqa: S102 - our own fixed text
    code = next(c for c in namespace["outer"].__code__.co_consts if inspect.iscode(c))
    if code.co_freevars != names:
        raise RuntimeError(f"cannot guard {like.co_name}: free variables {names} vs {code.co_freevars}")
    return code


def functions(reference) -> Iterator:
    """The plain Python functions behind a reference (a class gives its own methods)."""
    if isinstance(reference, functools._lru_cache_wrapper):
        reference.cache_clear()  # a cached answer would come back without running the function
        yield from functions(reference.__wrapped__)
    elif inspect.isclass(reference):
        for value in vars(reference).values():
            fn = getattr(value, "__func__", value)  # staticmethod and classmethod hold a function
            if inspect.isfunction(fn):
                yield fn
    elif inspect.isfunction(reference):
        yield reference
    else:
        raise TypeError(f"cannot guard {reference!r}: give functions or classes of course_lib")


def describe(reference) -> str:
    return f"{reference.__module__}.{reference.__qualname__}"


class _NoFreshCopies(importlib.abc.MetaPathFinder):
    """Refuses to import the guarded modules again (a reload would make unguarded copies)."""

    def __init__(self, modules: set[str]):
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        if name in self.modules:
            raise _trip(f"it imports {name} afresh while being checked; the course's answers are off limits")
        return None


class _ForbidTorch(TorchFunctionMode):
    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            raise _trip(f"it calls torch's {name}, which this exercise asks you to write yourself")
        return func(*args, **(kwargs or {}))


@contextmanager
def forbid(references: Iterable = (), torch_functions: Iterable[str] = ()):
    """While inside: the references and the named torch functions raise DelegationError."""
    swapped = []
    try:
        for reference in references:
            for fn in functions(reference):
                message = (f"it calls {describe(fn)}, the course's own answer to this exercise: "
                           "write it yourself with torch operations")
                swapped.append((fn, fn.__code__))
                fn.__code__ = _raising_code(message, fn.__code__)
        finder = _NoFreshCopies({fn.__module__ for fn, _ in swapped})
        sys.meta_path.insert(0, finder)
        mode = _ForbidTorch(set(torch_functions)) if torch_functions else None
        if mode is not None:
            mode.__enter__()
        try:
            yield
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
            sys.meta_path.remove(finder)
    finally:
        for fn, code in reversed(swapped):
            fn.__code__ = code

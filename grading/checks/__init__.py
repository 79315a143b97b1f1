"""The labs' checks, as data: one module per lecture (`vit`, `swin`, ..., `flamingo`).

A check module declares its exercises with `LAB.exercise(...)`: a function that yields the cases'
inputs (drawn from `gen(seed)`), the course's reference that computes the expected output, the
course functions that must not be reachable while the student's function runs, and a tolerance.
Two consumers read the same declaration:
- the notebook: `checks.patchify(patchify)` builds the visible cases (salt 0: the same on every
  run, so nbval can compare the printed line), runs the student's function under `grading.guard`
  and prints one line:

      [PASS] Exercise 1 patchify: 5/5 cases
      [TODO] Exercise 2 patch_embed_linear: not done yet (it raises NotImplementedError)
      [FAIL] Exercise 3 attention: case 2 (q 2x3x5x8, with mask): values differ by up to 0.41

- the grader (`grading.grade`): `LAB.cases(name, salt)` gives the hidden cases (same shapes, new
  values), whose inputs only reach the sandboxed student process; the expected values stay in the
  grader, which compares with `compare`.
`summary()` prints the total.
"""

from __future__ import annotations

import importlib
import pkgutil
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..guard import DelegationError, forbid, tripped

PASS, FAIL, TODO = "PASS", "FAIL", "TODO"
IN_GRADER = False  # set by the grader's sandboxed worker: the notebook's check cells do nothing there


@dataclass
class Result:
    number: int
    name: str
    status: str
    reason: str
    points: float
    max_points: float


@dataclass
class Case:
    """One call of the student's function: its arguments (tensors, numbers, strings, and tuples,
    lists and dicts of them: what travels to the sandbox), a description and, once built by
    `Lab.cases`, the expected output."""

    args: tuple
    description: str
    kwargs: dict = field(default_factory=dict)
    expected: Any = None


def plain_call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


@dataclass
class Exercise:
    name: str
    inputs: Callable[[Callable[[int], torch.Generator]], Iterable[Case]]
    reference: Callable  # the exercise's signature; computes the expected outputs
    blocked: tuple  # course functions and classes unreachable while the student's function runs
    atol: float = 1e-5
    call: Callable = plain_call  # call(fn, *args, **kwargs): how a function meets a case
    torch_functions: tuple[str, ...] = ()  # torch functions the exercise must not use
    points: float = 1.0

    def guard(self):
        return forbid((self.reference, *self.blocked), self.torch_functions)


class CheckFailed(Exception):
    pass


def compare(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Raise CheckFailed with a readable reason if `got` differs from `expected`."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise CheckFailed(f"expected a {type(expected).__name__} of {len(expected)} items, got {type(got).__name__}")
        for g, e in zip(got, expected):
            compare(g, e, atol, rtol)
        return
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"expected a tensor, got {type(got).__name__}")
        got = got.detach().as_subclass(torch.Tensor)  # a subclass's own comparisons are not used
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype.is_floating_point != expected.dtype.is_floating_point:
            raise CheckFailed(f"dtype {got.dtype}, expected {expected.dtype}")
        if not torch.allclose(got.to(expected.dtype), expected, atol=atol, rtol=rtol):
            diff = (got.to(expected.dtype) - expected).abs().max().item()
            raise CheckFailed(f"values differ by up to {diff:.3g}")
        return
    if isinstance(got, torch.Tensor) or got != expected:
        raise CheckFailed(f"got {got!r:.80}, expected {expected!r}")


def describe_error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    return f"{type(err).__name__}: {str(err)[:200]}" + (f" (line {last[0].lineno})" if last else "")


class Lab:
    """The exercises of one lab, in order; records one Result per exercise and prints the summary."""

    def __init__(self, number: str, title: str):
        self.number, self.title = number, title
        self.exercises: dict[str, Exercise] = {}
        self.results: dict[str, Result] = {}

    @property
    def points(self) -> dict[str, float]:
        return {name: e.points for name, e in self.exercises.items()}

    def exercise(self, reference: Callable, *, blocked: Iterable = (), atol: float = 1e-5, call: Callable = plain_call,
                 torch_functions: Iterable[str] = ()):
        """Declare an exercise: decorates the generator of its cases' inputs, named after it, and
        returns the check that the notebook calls (`checks.patchify(patchify)`)."""

        def declare(inputs: Callable) -> Callable:
            name = inputs.__name__
            self.exercises[name] = Exercise(name, inputs, reference, tuple(blocked), atol, call, tuple(torch_functions))

            def check(fn) -> Result | None:
                return self.run(name, fn)

            check.__name__, check.__qualname__, check.__doc__ = name, name, inputs.__doc__
            return check

        return declare

    def cases(self, name: str, salt: int = 0) -> list[Case]:
        """The cases of one exercise with their expected outputs: salt 0 gives the notebook's."""
        exercise = self.exercises[name]
        cases = list(exercise.inputs(lambda seed: torch.Generator().manual_seed(seed + salt)))
        for case in cases:
            case.expected = exercise.call(exercise.reference, *case.args, **case.kwargs)
        return cases

    def outcome(self, name: str, fn: Callable, cases: list[Case]) -> tuple[str, str]:
        """(status, reason) for running `fn` on the cases, under the exercise's guard."""
        exercise = self.exercises[name]
        if not callable(fn):
            return FAIL, f"expected a function, got {type(fn).__name__}"
        for i, case in enumerate(cases, 1):
            where = f"case {i} ({case.description})"
            start = len(tripped())
            try:
                with exercise.guard():
                    got = exercise.call(fn, *case.args, **case.kwargs)
                refused = tripped(start)
                if refused:
                    return FAIL, f"{where}: {refused[0]}"
                compare(got, case.expected, atol=exercise.atol)
            except NotImplementedError:
                return TODO, "not done yet (it raises NotImplementedError)"
            except CheckFailed as err:
                return FAIL, f"{where}: {err}"
            except Exception as err:  # noqa: BLE001 - the student's code crashed: say where
                refused = tripped(start)
                return FAIL, f"{where}: {refused[0] if refused else describe_error(err)}"
        return PASS, f"{len(cases)}/{len(cases)} cases"

    def run(self, name: str, fn: Callable) -> Result | None:
        if IN_GRADER:
            return None
        status, reason = self.outcome(name, fn, self.cases(name))
        number = list(self.exercises).index(name) + 1
        max_points = self.exercises[name].points
        result = Result(number, name, status, reason, max_points if status == PASS else 0.0, max_points)
        self.results[name] = result
        print(f"[{status}] Exercise {number} {name}: {reason}")
        return result

    def summary(self) -> dict:
        """Print and return the total over all exercises (unchecked ones count as TODO)."""
        done = sum(r.status == PASS for r in self.results.values())
        points = sum(r.points for r in self.results.values())
        total = sum(self.points.values())
        missing = [n for n in self.exercises if n not in self.results]
        print(f"{self.title}: {done}/{len(self.exercises)} exercises passed, {points:g}/{total:g} points")
        if missing:
            print(f"not checked yet: {', '.join(missing)}")
        return {"lab": self.title, "passed": done, "points": points, "max_points": total,
                "results": [vars(self.results[n]) for n in self.exercises if n in self.results]}


LECTURES = ("vit", "swin", "convnext", "mae", "dino", "clip", "qformer", "flamingo")  # labs 01..08


def lab_module(name: str):
    """The check module of a lab, by number ('1', '01') or lecture name ('vit')."""
    key = LECTURES[int(name) - 1] if str(name).isdigit() and 1 <= int(name) <= len(LECTURES) else str(name)
    if key not in LECTURES:
        raise KeyError(f"there is no lab {name!r}: the labs are " + ", ".join(f"{i:02d} ({n})" for i, n in enumerate(LECTURES, 1)))
    return importlib.import_module(f"{__name__}.{key}")


def all_labs() -> list:
    found = {m.name for m in pkgutil.iter_modules(__path__)}
    return [lab_module(name) for name in LECTURES if name in found]


__all__ = ["Case", "CheckFailed", "DelegationError", "Exercise", "FAIL", "Lab", "PASS", "TODO", "compare", "lab_module"]

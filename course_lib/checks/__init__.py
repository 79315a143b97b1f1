"""Exercise checks for the labs.

Each lab has a module here (`lab01`, ...) whose functions take the student's function, run it on
visible and hidden cases, compare with the `course_lib` reference, and print one line:

    [PASS] Exercise 1 patchify: 6/6 cases
    [TODO] Exercise 2 patch_embed_linear: not done yet (it raises NotImplementedError)
    [FAIL] Exercise 3 attention: case 2 (q 2x3x5x8, with mask): values differ by up to 0.41

`summary()` prints the total. The cases are drawn from fixed seeds, so the printed lines are the
same on every run (nbval compares them in CI).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

PASS, FAIL, TODO = "PASS", "FAIL", "TODO"


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
    """One call of the student's function: its arguments, the expected output and a description."""

    args: tuple
    expected: Any
    description: str
    kwargs: dict = field(default_factory=dict)


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
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailed(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype.is_floating_point != expected.dtype.is_floating_point:
            raise CheckFailed(f"dtype {got.dtype}, expected {expected.dtype}")
        if not torch.allclose(got.detach().to(expected.dtype), expected, atol=atol, rtol=rtol):
            diff = (got.detach().to(expected.dtype) - expected).abs().max().item()
            raise CheckFailed(f"values differ by up to {diff:.3g}")
        return
    if got != expected:
        raise CheckFailed(f"got {got!r}, expected {expected!r}")


class Lab:
    """The checks of one lab: records one Result per exercise and prints the summary."""

    def __init__(self, title: str, exercises: list[str], points: dict[str, float] | None = None):
        self.title = title
        self.exercises = exercises
        self.points = points or {name: 1.0 for name in exercises}
        self.results: dict[str, Result] = {}

    def run(self, name: str, student_fn: Callable, cases: Iterable[Case], atol: float = 1e-5) -> Result:
        number = self.exercises.index(name) + 1
        cases = list(cases)
        status, reason = PASS, f"{len(cases)}/{len(cases)} cases"
        if not callable(student_fn):
            status, reason = FAIL, f"expected a function, got {type(student_fn).__name__}"
        else:
            for i, case in enumerate(cases, 1):
                try:
                    got = student_fn(*case.args, **case.kwargs)
                    compare(got, case.expected, atol=atol)
                except NotImplementedError:
                    status, reason = TODO, "not done yet (it raises NotImplementedError)"
                    break
                except CheckFailed as err:
                    status, reason = FAIL, f"case {i} ({case.description}): {err}"
                    break
                except Exception as err:  # the student's code crashed: say where
                    last = traceback.extract_tb(err.__traceback__)[-1]
                    status = FAIL
                    reason = f"case {i} ({case.description}): {type(err).__name__}: {err} (line {last.lineno})"
                    break
        max_points = self.points[name]
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
        return {
            "lab": self.title,
            "passed": done,
            "points": points,
            "max_points": total,
            "results": [vars(self.results[n]) for n in self.exercises if n in self.results],
        }

"""Checks for lab 05 (DINO). The references are course_lib.dino's own functions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import dino
from . import Case, CheckFailed, Lab

LAB = Lab("Lab 05 (DINO)", ["dino_loss", "update_center", "ema_update", "koleo_loss"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dino_loss(fn) -> None:
    """(student_out (V_s, B, K), teacher_out (V_t, B, K), center (K,), tau_s, tau_t) -> scalar;
    hidden cases: one teacher view, many local views, a large center, other temperatures."""
    cases = []
    for i, (V_s, V_t, B, K, tau_s, tau_t, c_scale) in enumerate(
        [(2, 2, 4, 8, 0.1, 0.04, 0.0), (6, 2, 3, 16, 0.1, 0.04, 1.0), (3, 1, 5, 6, 0.2, 0.07, 1.0), (10, 2, 2, 32, 0.1, 0.02, 5.0), (4, 3, 2, 5, 0.5, 0.5, 1.0)]
    ):
        g = _gen(50 + i)
        s, t, c = torch.randn(V_s, B, K, generator=g), torch.randn(V_t, B, K, generator=g), torch.randn(K, generator=g) * c_scale
        expected = dino.dino_loss(s, t, c, tau_s, tau_t)
        cases.append(Case((s, t, c, tau_s, tau_t), expected, f"{V_s} student views, {V_t} teacher views, B={B}, K={K}, tau_t={tau_t}"))
    LAB.run("dino_loss", fn, cases, atol=1e-5)


def update_center(fn) -> None:
    """(center (K,), teacher_out (V_t, B, K), momentum) -> new center (K,)."""
    cases = []
    for i, (V_t, B, K, m) in enumerate([(2, 4, 8, 0.9), (1, 3, 5, 0.0), (2, 16, 32, 0.99), (3, 2, 4, 0.5)]):
        g = _gen(60 + i)
        c, t = torch.randn(K, generator=g), torch.randn(V_t, B, K, generator=g)
        cases.append(Case((c, t, m), dino.update_center(c, t, m), f"{V_t} views of {B} images, K={K}, momentum {m}"))
    LAB.run("update_center", fn, cases)


def _small_net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 3))


def _ema_result(fn, teacher: nn.Module, student: nn.Module, momentum: float) -> list[torch.Tensor]:
    """Run the student's in-place update on copies; return the teacher's parameters after it,
    and check that the student's parameters were left alone."""
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    before = [p.detach().clone() for p in student.parameters()]
    fn(teacher, student, momentum)
    if any(not torch.equal(a, p) for a, p in zip(before, student.parameters())):
        raise CheckFailed("the student's parameters changed: update only the teacher")
    return [p.detach().clone() for p in teacher.parameters()]


def ema_update(fn) -> None:
    """(teacher, student, momentum) -> None, updating the teacher's parameters in place."""
    cases = []
    for i, (width, m) in enumerate([(5, 0.9), (8, 0.0), (3, 1.0), (6, 0.996)]):
        teacher, student = _small_net(70 + i, width), _small_net(80 + i, width)
        expected_teacher = copy.deepcopy(teacher)
        dino.ema_update(expected_teacher, student, m)
        expected = [p.detach().clone() for p in expected_teacher.parameters()]
        cases.append(Case((teacher, student, m), expected, f"an MLP of width {width}, momentum {m}"))
    LAB.run("ema_update", lambda t, s, m: _ema_result(fn, t, s, m), cases, atol=1e-6)


def _koleo_or_error(fn, x: torch.Tensor):
    try:
        return fn(x)
    except NotImplementedError:
        raise
    except ValueError:
        return "ValueError"


def koleo_loss(fn) -> None:
    """(x (B, D)) -> scalar; a batch of one must raise ValueError. Hidden: duplicates, large B."""
    cases = []
    for i, (B, D) in enumerate([(8, 4), (3, 2), (64, 16), (2, 5)]):
        x = torch.randn(B, D, generator=_gen(90 + i)) * (i + 1)
        cases.append(Case((x,), dino.koleo_loss(x), f"{B} vectors of dimension {D}"))
    x = torch.randn(6, 3, generator=_gen(99))
    x[3] = x[1] * 2  # same direction: distance 0 after normalisation, the eps keeps it finite
    cases.append(Case((x,), dino.koleo_loss(x), "two vectors with the same direction"))
    cases.append(Case((torch.randn(1, 4, generator=_gen(98)),), "ValueError", "a batch of one (must raise ValueError)"))
    LAB.run("koleo_loss", lambda x: _koleo_or_error(fn, x), cases, atol=1e-4)


def summary() -> dict:
    return LAB.summary()

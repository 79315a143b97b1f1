"""Checks for lab 05 (DINO)."""

from __future__ import annotations

import copy

import torch
from torch import nn

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import dino

from . import Case, CheckFailed, Lab

LAB = Lab("05", "Lab 05 (DINO)")


def _small_net(state: dict[str, torch.Tensor]) -> nn.Module:
    width = state["0.weight"].shape[0]
    net = nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 3))
    net.load_state_dict(state)
    return net


def _random_state(width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"0.weight": (width, 4), "0.bias": (width,), "1.weight": (width,), "1.bias": (width,), "3.weight": (3, width), "3.bias": (3,)}
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def call_ema(fn, teacher_state, student_state, momentum):
    """Build the two networks, run the in-place update; return the teacher's parameters after
    it, having checked that the student's were left alone."""
    teacher, student = _small_net(teacher_state), _small_net(student_state)
    before = [p.detach().clone() for p in student.parameters()]
    fn(teacher, student, momentum)
    if any(not torch.equal(a, p) for a, p in zip(before, student.parameters())):
        raise CheckFailed("the student's parameters changed: update only the teacher")
    return [p.detach().clone() for p in teacher.parameters()]


def call_koleo(fn, x):
    """The loss, or "ValueError" when the function raises it (a batch of one must)."""
    try:
        return fn(x)
    except ValueError:
        return "ValueError"


@LAB.exercise(dino.dino_loss)
def dino_loss(gen):
    """(student_out (V_s, B, K), teacher_out (V_t, B, K), center (K,), tau_s, tau_t) -> scalar;
    hidden cases: one teacher view, many local views, a large center, other temperatures."""
    for i, (V_s, V_t, B, K, tau_s, tau_t, c_scale) in enumerate(
        [(2, 2, 4, 8, 0.1, 0.04, 0.0), (6, 2, 3, 16, 0.1, 0.04, 1.0), (3, 1, 5, 6, 0.2, 0.07, 1.0), (10, 2, 2, 32, 0.1, 0.02, 5.0), (4, 3, 2, 5, 0.5, 0.5, 1.0)]
    ):
        g = gen(50 + i)
        s, t, c = torch.randn(V_s, B, K, generator=g), torch.randn(V_t, B, K, generator=g), torch.randn(K, generator=g) * c_scale
        yield Case((s, t, c, tau_s, tau_t), f"{V_s} student views, {V_t} teacher views, B={B}, K={K}, tau_t={tau_t}")


@LAB.exercise(dino.update_center)
def update_center(gen):
    """(center (K,), teacher_out (V_t, B, K), momentum) -> new center (K,)."""
    for i, (V_t, B, K, m) in enumerate([(2, 4, 8, 0.9), (1, 3, 5, 0.0), (2, 16, 32, 0.99), (3, 2, 4, 0.5)]):
        g = gen(60 + i)
        yield Case((torch.randn(K, generator=g), torch.randn(V_t, B, K, generator=g), m), f"{V_t} views of {B} images, K={K}, momentum {m}")


@LAB.exercise(dino.ema_update, atol=1e-6, call=call_ema)
def ema_update(gen):
    """(teacher, student, momentum) -> None, updating the teacher's parameters in place."""
    for i, (width, m) in enumerate([(5, 0.9), (8, 0.0), (3, 1.0), (6, 0.996)]):
        g = gen(70 + i)
        yield Case((_random_state(width, g), _random_state(width, g), m), f"an MLP of width {width}, momentum {m}")


@LAB.exercise(dino.koleo_loss, atol=1e-4, call=call_koleo)
def koleo_loss(gen):
    """(x (B, D)) -> scalar; a batch of one must raise ValueError. Hidden: duplicates, large B."""
    for i, (B, D) in enumerate([(8, 4), (3, 2), (64, 16), (2, 5)]):
        yield Case((torch.randn(B, D, generator=gen(90 + i)) * (i + 1),), f"{B} vectors of dimension {D}")
    x = torch.randn(6, 3, generator=gen(99))
    x[3] = x[1] * 2  # same direction: distance 0 after normalisation, the eps keeps it finite
    yield Case((x,), "two vectors with the same direction")
    yield Case((torch.randn(1, 4, generator=gen(98)),), "a batch of one (must raise ValueError)")


def summary() -> dict:
    return LAB.summary()

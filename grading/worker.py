"""The process that runs one student's notebook, inside the sandbox (`grading.sandbox`).

    python -m grading.worker JOB_DIR     # run by the grader, never by hand

It reads `JOB_DIR/job.json` (the code cells, the lab, the time limit; no salt, no expected value)
and the hidden cases' inputs from its standard input (tensors and plain data, loaded with
`weights_only`), before any student code runs. Then, with the course's answers to every exercise
of the lab unreachable for the whole run (`grading.guard`) and the notebook's own check cells
turned into no-ops, it runs the cells in order in a fresh IPython shell, a time limit per cell,
and calls each exercise's function on the cases. What it sends back on its standard output (the
student's own prints go to /dev/null) is untrusted by the grader: progress lines
`{"step": "cell 3"}` and one result, `{"result": N}` then N bytes of `torch.save` output holding
only the student's outputs.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

MAX_THREADS = 4  # what a student's torch.set_num_threads(1000) is clamped to
MAX_OUTPUT = 16 * 2**20  # bytes of tensors in one output: the checks' outputs are a few kB


class _Timeout(BaseException):
    """Raised in the student's code at the time limit. Not an Exception, so that `except Exception`
    there does not swallow it; and it fires again every second, in case a bare `except:` does."""


_deadline = [0.0]


def _on_alarm(signum, frame):
    if _deadline[0] and time.monotonic() >= _deadline[0]:
        raise _Timeout()


def _limit(seconds: float) -> None:
    """Arm the time limit (0 disarms it)."""
    _deadline[0] = time.monotonic() + seconds if seconds else 0.0
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0 if seconds else 0)


def describe(err: BaseException, job: dict) -> str:
    """One line about an exception from the student's code, worded as the checks word it."""
    if isinstance(err, _Timeout):
        return f"timed out after {job['timeout']:g} s"
    if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
        return f"ran out of memory (the limit is {job['memory_gb']:g} GB): {type(err).__name__}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith("<ipython-input")]  # the notebook's own
    line = err.lineno if isinstance(err, SyntaxError) else frames[-1].lineno if frames else None
    message = str(err.msg if isinstance(err, SyntaxError) else err).strip().split("\n")[0][:200]
    return f"{type(err).__name__}: {message}" + (f" (line {line})" if line else "")


def plain(x, depth: int = 0):
    """An output as plain tensors, lists, tuples, numbers and strings: what the grader accepts."""
    if depth > 4:
        return {"unsupported type": "nesting deeper than 4"}
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().as_subclass(torch.Tensor).clone()
    if isinstance(x, (list, tuple)):
        return (list if isinstance(x, list) else tuple)(plain(v, depth + 1) for v in x[:1000])
    for kind in (bool, int, float):
        if isinstance(x, kind):
            return kind(x)
    if isinstance(x, str):
        return str(x)[:1000]
    return None if x is None else {"unsupported type": type(x).__name__[:100]}


def _tensors(x, depth: int = 0):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)) and depth < 5:
        for v in x[:1000]:
            yield from _tensors(v, depth + 1)


def _clamp_threads() -> None:
    """A student's thread count is clamped, not punished: set_num_threads(1000) gives MAX_THREADS."""
    for name in ("set_num_threads", "set_num_interop_threads"):
        original = getattr(torch, name)

        def clamped(n, _original=original):
            return _original(max(1, min(int(n), MAX_THREADS)))

        setattr(torch, name, clamped)


def main(job_dir: str) -> None:
    run(json.loads((Path(job_dir) / "job.json").read_text()))


def run(job: dict) -> None:
    """Run the job (its inputs on standard input), send the report, exit. Also what a submission
    forked from a zygote (`grading.zygote`) runs."""
    channel = os.fdopen(os.dup(1), "wb", buffering=0)  # to the grader; the student's prints go nowhere
    inputs = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    save = torch.save  # taken before any student code: a patched torch.save changes nothing here

    def send(message: dict, data: bytes = b"") -> None:
        channel.write(json.dumps(message).encode() + b"\n" + data)

    send({"step": "setup"})
    limit = int(job["memory_gb"] * 2**30)
    try:  # per process, on top of the sandbox's budget for the whole submission
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    torch.set_num_threads(1)
    _clamp_threads()
    os.environ.update(MPLBACKEND="Agg", IPYTHONDIR=str(Path.cwd() / ".ipython"), OMP_NUM_THREADS="1")

    import grading.checks
    from grading.checks import CheckFailed, lab_module
    from grading.guard import forbid, tripped
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    lab = lab_module(job["lab"]).LAB
    grading.checks.IN_GRADER = True  # the notebook's check cells do nothing here
    lockdown = forbid([r for e in lab.exercises.values() for r in (e.reference, *e.blocked)])
    lockdown.__enter__()  # and never left: no student code runs with the course's answers reachable
    config = Config()
    config.HistoryManager.enabled, config.InteractiveShell.colors = False, "nocolor"
    shell = InteractiveShell.instance(config=config)
    signal.signal(signal.SIGALRM, _on_alarm)
    report: dict = {"cells": {}}
    for k, src in enumerate(job["cells"], 1):
        if k in job["skip_cells"]:
            continue
        send({"step": f"cell {k}"})
        try:
            _limit(job["timeout"])
            result = shell.run_cell(src, store_history=False)
            err = result.error_before_exec or result.error_in_exec
        except _Timeout as timed_out:  # it fired again while IPython was reporting the first one
            err = timed_out
        finally:
            _limit(0)
        if err is not None:
            report["cells"][str(k)] = describe(err, job)
    ns = dict(shell.user_ns)
    report["defined"] = {name: type(ns[name]).__name__[:100] if name in ns else None for name in lab.exercises}
    report["functions"] = sorted(k for k, v in ns.items() if inspect.isfunction(v) and not k.startswith("_"))[:1000]
    report["outputs"] = {}
    for name, exercise in lab.exercises.items():
        fn = ns.get(name)
        if name in job["skip_exercises"] or not callable(fn):
            continue
        send({"step": f"exercise {name}"})
        outputs = []
        try:
            _limit(job["timeout"])
            for args, kwargs in inputs.get(name, []):  # until the first error: the checks stop there too
                start = len(tripped())
                try:
                    with exercise.guard():
                        got = exercise.call(fn, *args, **kwargs)
                    size = sum(t.numel() * t.element_size() for t in _tensors(got))
                    outputs.append(["ok", plain(got)] if size <= MAX_OUTPUT else
                                   ["error", f"its output is too large ({size / 2**20:.0f} MB; the expected one is a few kB)"])
                except NotImplementedError:
                    outputs.append(["todo"])
                except CheckFailed as err:  # the check's own condition (lab 05: the student's parameters changed)
                    outputs.append(["error", str(err)[:300]])
                except BaseException as err:  # noqa: BLE001 - the time limit and SystemExit included
                    outputs.append(["error", describe(err, job)])
                if tripped(start):  # even if the student's code caught the refusal
                    outputs[-1] = ["error", tripped(start)[0]]
                if outputs[-1][0] != "ok":
                    break
        except _Timeout:  # between two cases
            outputs.append(["error", describe(_Timeout(), job)])
        finally:
            _limit(0)
        report["outputs"][name] = outputs
    buffer = io.BytesIO()
    save(report, buffer)
    send({"result": buffer.tell()}, buffer.getvalue())
    channel.flush()
    os._exit(0)  # now: threads or atexit hooks the notebook left behind do not run


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/job")

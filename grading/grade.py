"""Grade students' lab notebooks: a gradebook (CSV and JSON) and a feedback text for each student.

    python -m course_lib.grade submissions/ --out gradebook/    # a folder (what `make grade` runs)
    python -m course_lib.grade alice.ipynb bob.ipynb --lab 01   # files; --lab when a notebook can't tell

Submissions. In a folder every file counts, except hidden ones, so that a PDF or an empty file
handed in instead of the notebook gets rows that say so: `alice.ipynb` is student "alice", and so is
`alice/anything.ipynb` (one folder per student). The lab is read from the notebook (its
`course_lib.checks import lab01` line, else its `# Lab 01` title, else the file name).

How one submission is graded, so that nothing in it can grade itself:
1. Its code cells run in order in a fresh IPython shell (what a Jupyter kernel runs) in a process of
   its own, under a memory limit and a time limit per cell. A cell that raises, loops or runs out
   of memory is stopped and the next cells run, as in Jupyter; a cell that kills the process, or
   that does not stop, is skipped on a rerun.
2. In that process each exercise's function, found by its name (`patchify`), is called on the
   cases of its check, under the same time limit, and only its outputs are kept.
3. This process, which never runs student code, builds the same cases, computes the expected
   outputs with course_lib and compares. The cases have the shapes of the notebook's check cells
   but new random values (their seeds are offset by a number taken from the submission's hash; masks
   and index tables have none), so outputs copied into the notebook fail, and whatever the notebook
   does to course_lib, torch or its check cells changes only its own process. On top of that,
   reading the code: a notebook that assigns to course_lib or the checks (or to torch's
   comparisons) gets no credit for the exercises it targets (all of them when it names none), nor
   does an exercise that uses course_lib.

Output (--out, default gradebook/): gradebook.csv and gradebook.json, one row per student and
exercise (points, status PASS/FAIL/TODO/MISSING/ERROR, reason), and feedback/STUDENT.txt, each
replaced atomically after every submission; submissions are only read. A rerun grades only the
submissions whose bytes, or the grader's version or settings, changed (--regrade: all of them), so
an interrupted batch resumes and a finished one comes out the same, byte for byte. POSIX only (Linux,
macOS); it keeps honest mistakes and cheating out of the grades, but it is not a security sandbox:
grade untrusted files in a container.
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import hashlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import resource
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

from . import checks as checks_package
from .checks import FAIL, PASS, TODO, CheckFailed, compare

VERSION = "1"  # kept in the gradebook: a new version grades everything again
MISSING, ERROR = "MISSING", "ERROR"
FIELDS = ["student", "lab", "number", "exercise", "points", "max_points", "status", "reason"]
SETUP_S, GRACE_S = 120, 5  # for a worker to start; past its time limit, before a step is killed
_collect_lock, _start_lock = threading.Lock(), threading.Lock()


class GradeError(Exception):
    """A problem with the command line: printed, exit status 1."""


# ----------------------------------------------------------------------- labs and their cases


def lab_checks(number: str) -> ModuleType:
    """The check module of a lab: '1' or '01' -> course_lib.checks.lab01."""
    known = sorted(m.name[3:] for m in pkgutil.iter_modules(checks_package.__path__) if m.name.startswith("lab"))
    name = f"{int(number):02d}" if str(number).isdigit() else str(number)
    if name not in known:
        raise GradeError(f"there is no lab {number!r}: the labs are {', '.join(known)}")
    return importlib.import_module(f"course_lib.checks.lab{name}")


def identify_lab(code: str, markdown: str, filename: str) -> str | None:
    """The lab a notebook is for, from its check import, else its title, else its file name."""
    for pattern, text in [(r"checks\s+import\s+lab(\d+)|checks\.lab(\d+)", code), (r"^#\s*Lab\s+(\d+)\b", markdown),
                          (r"lab[ _-]?(\d+)", filename.lower())]:
        m = re.search(pattern, text, flags=re.M)
        if m:
            return f"{int(next(g for g in m.groups() if g)):02d}"
    return None


def read_notebook(data: bytes) -> tuple[list[str], str]:
    """The code cells and the markdown of a notebook file (format 4, or 3 from before 2015).
    Raises ValueError saying what the file is instead."""
    if not data.strip():
        raise ValueError("empty file")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        kind = {b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive"}.get(data[:4], f"not valid JSON ({err})")
        raise ValueError(f"not a notebook: {kind}") from None
    try:
        cells = nb["cells"] if "cells" in nb else [c for sheet in nb["worksheets"] for c in sheet["cells"]]  # format 4, 3
    except (KeyError, TypeError):
        cells = None
    if not isinstance(cells, list) or not isinstance(nb, dict):
        raise ValueError("not a notebook: JSON without cells")

    def text(cell: dict) -> str:
        value = cell.get("source", cell.get("input", ""))  # format 3 calls code "input"
        return "".join(value) if isinstance(value, list) else str(value)

    cells = [c for c in cells if isinstance(c, dict)]
    return [text(c) for c in cells if c.get("cell_type") == "code"], "\n".join(text(c) for c in cells if c.get("cell_type") == "markdown")


def collect(checks: ModuleType, salt: int, student=lambda name: None) -> dict:
    """{exercise: (function, cases, atol)}, built by the lab's own check functions without running
    them. They draw their random values from `_gen(seed)`: here the seeds are offset by `salt` (0
    gives the notebook's own cases). `student(name)` is the function they are given to check."""
    runs = {}
    with _collect_lock:  # the check modules are shared by the grading threads
        gen = checks._gen
        checks._gen = lambda seed: torch.Generator().manual_seed(seed + salt)
        checks.LAB.run = lambda name, fn, cases, atol=1e-5: runs.__setitem__(name, (fn, list(cases), atol))  # Lab.run's default atol
        try:
            for name in checks.LAB.exercises:
                getattr(checks, name)(student(name))
        finally:
            checks._gen = gen
            del checks.LAB.run
    return runs


# ------------------------------------------------------------------ what reading the code tells


def static_checks(cells: list[str], exercises: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Read the code without running it. Returns {exercise: why it gets no credit} (the notebook
    changes course_lib, the checks, sys.modules or torch's comparisons; or the exercise uses
    course_lib) and {function: the code cell that defines it}, cells that do not compile included."""
    from IPython.core.inputtransformer2 import TransformerManager

    trees, where = [], {}
    for k, src in enumerate(cells, 1):
        where.update((name, k) for name in re.findall(r"^\s*def\s+(\w+)", src, flags=re.M))
        try:
            src = TransformerManager().transform_cell(src)  # `%pip ...` -> get_ipython().run_line_magic(...)
            trees.append((k, src, ast.parse(src)))
        except (SyntaxError, ValueError):
            pass  # the worker reports it
    nodes = [(k, src, node) for k, src, tree in trees for node in ast.walk(tree)]

    def modules(node: ast.AST) -> list[tuple[str, ast.alias]]:  # (module, alias) for each name an import binds
        if isinstance(node, ast.ImportFrom):
            return [(node.module or "", a) for a in node.names]
        return [(a.name, a) for a in node.names] if isinstance(node, ast.Import) else []

    def bound(package: str) -> set[str]:  # the names that imports from a package bind
        return {package} | {a.asname or a.name.split(".")[0] for _, _, n in nodes for m, a in modules(n) if m.split(".")[0] == package}

    course, torch_names = bound("course_lib"), bound("torch")
    comparisons = {"allclose", "isclose", "equal", "eq", "__eq__", "testing"}
    no_credit: dict[str, str] = {}
    for k, src, node in nodes:
        if isinstance(node, (ast.Assign, ast.Delete, ast.AugAssign, ast.AnnAssign)):
            targets = getattr(node, "targets", [getattr(node, "target", None)])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and len(node.args) > 1:
            targets = [ast.Attribute(node.args[0], getattr(node.args[1], "value", "?"))]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in course:
            targets = [ast.Name(node.name)]  # `class checks: ...` stands in for the checks
        else:
            continue
        for chain in map(_chain, targets):
            if chain and (chain[0] in course or chain[:2] == ["sys", "modules"] or (chain[0] in torch_names and comparisons & set(chain))):
                line = (ast.get_source_segment(src, node) or "").split("\n")[0][:60]
                for name in [n for n in exercises if n in chain] or exercises:
                    no_credit.setdefault(name, f"no credit: the notebook changes {'.'.join(map(str, chain))} (code cell {k}: `{line}`)")
    definitions = {}  # the last top-level statement that binds each name
    for _, _, tree in trees:
        for node in tree.body:
            names = [getattr(node, "name", None)] + [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            definitions.update((n, node) for n in names + [a.asname or a.name.split(".")[0] for _, a in modules(node)] if n)
    for name in set(exercises) & definitions.keys():  # an exercise that lets course_lib do the work
        inside = list(ast.walk(definitions[name]))
        uses = [n for n in inside if isinstance(n, ast.Name) and n.id in course]
        if uses or any(m.startswith("course_lib") for n in inside for m, _ in modules(n)):
            how = f"`{uses[0].id}`, line {uses[0].lineno}" if uses else "an import"
            no_credit.setdefault(name, f"no credit: it uses course_lib ({how}); the lab asks for torch operations only")
    return no_credit, where


def _chain(node: ast.AST) -> list[str]:
    """['checks', 'LAB', 'run'] for `checks.LAB.run` (string subscripts included); [] for others."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            parts.append(node.slice.value)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


# ------------------------------------------------------ the worker process: runs the student's code


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


def _describe(err: BaseException, job: dict) -> str:
    """One line about an exception from the student's code, worded as the checks word it."""
    if isinstance(err, _Timeout):
        return f"timed out after {job['timeout']:g} s"
    if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
        return f"ran out of memory (the limit is {job['memory_gb']:g} GB): {type(err).__name__}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith("<ipython-input")]  # the notebook's own
    line = err.lineno if isinstance(err, SyntaxError) else frames[-1].lineno if frames else None
    message = str(err.msg if isinstance(err, SyntaxError) else err).strip().split("\n")[0][:200]
    return f"{type(err).__name__}: {message}" + (f" (line {line})" if line else "")


def _plain(x):
    """An output as plain tensors, lists, tuples, numbers and strings: what the grader loads back."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().clone()
        return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)
    if isinstance(x, (list, tuple)):
        return (list if isinstance(x, list) else tuple)(_plain(v) for v in x)
    for kind in (bool, int, float, str):
        if isinstance(x, kind):
            return kind(x)
    return None if x is None else {"unsupported type": type(x).__name__}


def _worker(job_path: str) -> None:
    """Run one notebook, then call its exercise functions; write their outputs next to the job."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    os.setsid()  # a process group of its own: killing the group kills what the notebook started too
    job = json.loads(Path(job_path).read_text())
    out = Path(job_path).parent
    (out / "work").mkdir()
    os.chdir(out / "work")  # the notebook's files go there, away from the grader's
    os.environ.update(MPLBACKEND="Agg", IPYTHONDIR=str(out / "work" / ".ipython"))
    log = os.open(out / "log.txt", os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1), os.dup2(log, 2)
    limit = int(job["memory_gb"] * 2**30)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # hard as well: the notebook cannot raise it
    except (ValueError, OSError):  # macOS may refuse it: no memory limit there
        pass
    progress = out / "progress"  # the current step, for the grader to know what killed us
    progress.write_text("setup")
    torch.set_num_threads(1)
    runs = collect(lab_checks(job["lab"]), job["salt"], lambda name: lambda *args, **kwargs: shell.user_ns[name](*args, **kwargs))
    config = Config()
    config.HistoryManager.enabled, config.InteractiveShell.colors = False, "nocolor"
    shell = InteractiveShell.instance(config=config)
    signal.signal(signal.SIGALRM, _on_alarm)
    report = {"cells": {}}
    for k, src in enumerate(job["cells"], 1):
        if k not in job["skip_cells"]:
            progress.write_text(f"cell {k}")
            try:
                _limit(job["timeout"])
                result = shell.run_cell(src, store_history=False)
                err = result.error_before_exec or result.error_in_exec
            except _Timeout as timed_out:  # it fired again while IPython was reporting the first one
                err = timed_out
            finally:
                _limit(0)
            if err is not None:
                report["cells"][k] = _describe(err, job)
    ns = shell.user_ns
    report["defined"] = {name: type(ns[name]).__name__ if name in ns else None for name in runs}
    report["functions"] = sorted(k for k, v in ns.items() if inspect.isfunction(v) and not k.startswith("_"))
    (out / "report.json").write_text(json.dumps(report))
    for name, (fn, cases, _) in runs.items():
        if name in job["skip_exercises"] or not callable(ns.get(name)):
            continue
        progress.write_text(f"exercise {name}")
        outputs = []
        try:
            _limit(job["timeout"])
            for case in cases:  # until the first error: the checks stop there too
                try:
                    outputs.append(["ok", _plain(fn(*case.args, **case.kwargs))])
                except NotImplementedError:
                    outputs.append(["todo"])
                except BaseException as err:  # noqa: BLE001 - the time limit and SystemExit included
                    outputs.append(["error", _describe(err, job)])
                if outputs[-1][0] != "ok":
                    break
        except _Timeout:  # between two cases
            outputs.append(["error", _describe(_Timeout(), job)])
        finally:
            _limit(0)
        torch.save(outputs, out / f"{name}.pt")
    progress.write_text("done")


# ------------------------------------------------------------- this process: run, compare, record


def run_notebook(cells: list[str], lab: str, salt: int, opts) -> tuple[dict, dict, dict]:
    """Run a notebook in a worker process. Returns the worker's report, {exercise: outputs} and
    {exercise: why it was not run}. A step that kills the worker, or does not stop, is skipped on a
    rerun. Raises RuntimeError when the submission cannot be graded, OSError when the machine fails."""
    skip_cells: dict[int, str] = {}
    skip_exercises: dict[str, str] = {}
    context = multiprocessing.get_context("forkserver")  # workers fork from a process that imported torch once
    context.set_forkserver_preload(["course_lib.grade", "IPython.core.interactiveshell"])
    start = time.monotonic()
    for _ in range(4):
        with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
            tmp, attempt = Path(tmp), time.time()
            job = dict(cells=cells, lab=lab, salt=salt, timeout=opts.timeout, memory_gb=opts.memory,
                       skip_cells=sorted(skip_cells), skip_exercises=sorted(skip_exercises))
            (tmp / "job.json").write_text(json.dumps(job))
            proc = context.Process(target=importlib.import_module("course_lib.grade")._worker, args=(str(tmp / "job.json"),))
            with _start_lock:  # a worker needs nothing from __main__: multiprocessing would run it again there
                main, sys.modules["__main__"] = sys.modules["__main__"], ModuleType("__main__")
                try:
                    proc.start()
                finally:
                    sys.modules["__main__"] = main
            why = None
            while why is None and proc.is_alive():
                proc.join(0.2)
                step, since = _progress(tmp, attempt)
                limit = SETUP_S if step == "setup" else opts.timeout
                if time.monotonic() - start > opts.total:
                    why = f"the whole notebook ran past {opts.total:g} s"
                elif time.time() - since > limit + GRACE_S:
                    why = f"timed out after {limit:g} s"
            _kill(proc)  # and whatever the notebook started
            step, _ = _progress(tmp, attempt)
            if step == "done":
                report = json.loads((tmp / "report.json").read_text())
                report["cells"] = {int(k): v for k, v in report["cells"].items()} | skip_cells
                outputs = {}
                for name in report["defined"]:
                    try:
                        outputs[name] = torch.load(tmp / f"{name}.pt", weights_only=True)  # tensors and plain data only
                    except Exception:  # noqa: BLE001 - not written, or not what the worker writes: no output
                        pass
                return report, outputs, skip_exercises
            rc = proc.exitcode
            why = why or f"the kernel died ({f'signal {-rc}' if rc < 0 else f'exit code {rc}'}{', out of memory?' if rc == -9 else ''})"
            if step == "setup":  # before any student code
                log = (tmp / "log.txt").read_text(errors="replace").strip().split("\n") if (tmp / "log.txt").exists() else [""]
                raise OSError(f"the worker failed to start: {why}" + (f": {log[-1][:200]}" if log[-1] else ""))
            if "whole notebook" in why:
                raise RuntimeError(why)
            if step.startswith("cell "):
                skip_cells[int(step[5:])] = f"{why}; skipped on a rerun"
            else:
                skip_exercises[step[9:]] = f"{why} while running it"
    raise RuntimeError("the notebook kept stopping the kernel: gave up after four runs")


def _progress(tmp: Path, started: float) -> tuple[str, float]:
    """The worker's current step and when it began (`started`, until the worker says)."""
    try:
        return (tmp / "progress").read_text(), (tmp / "progress").stat().st_mtime
    except OSError:
        return "setup", started


def _kill(proc: multiprocessing.Process) -> None:
    """Stop a worker and whatever the notebook started: they share the worker's process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # no group: it died before making one, or nothing is left in it
        pass
    if proc.is_alive():
        proc.kill()
    proc.join()


def score(cases: list, atol: float, outputs: list) -> tuple[str, str]:
    """(status, reason) for one exercise, worded as Lab.run words it."""
    for i, case in enumerate(cases, 1):
        where = f"case {i} ({case.description})"
        kind, *value = outputs[i - 1] if i <= len(outputs) else ["error", "no output"]
        if kind == "todo":
            return TODO, "not done yet (it raises NotImplementedError)"
        if kind == "error":
            return FAIL, f"{where}: {value[0]}"
        got = value[0]
        if isinstance(got, dict) and set(got) == {"unsupported type"}:
            got = type(got["unsupported type"], (), {})()  # so that compare() names its type
        try:
            compare(got, case.expected, atol=atol)
        except CheckFailed as err:
            return FAIL, f"{where}: {err}"
        except Exception as err:  # noqa: BLE001 - an output compare() cannot handle
            return FAIL, f"{where}: its output cannot be compared ({type(err).__name__})"
    return PASS, f"{len(cases)}/{len(cases)} cases"


def grade(path: Path, student: str, shown: str, opts, batch_lab: str | None = None) -> dict:
    """Grade one file: its record, with one row per exercise. Never raises for a bad submission."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    record = {"student": student, "file": shown, "sha256": sha, "lab": opts.lab or batch_lab, "title": None, "notes": [], "rows": []}
    try:
        cells, markdown = read_notebook(data)
        record["lab"] = opts.lab or identify_lab("\n".join(cells), markdown, path.name) or batch_lab
        if record["lab"] is None:
            raise ValueError("cannot tell which lab this notebook is for: grade it with --lab NN")
        checks = lab_checks(record["lab"])
        salt = int(sha[:12], 16)  # new random values, which the notebook cannot know before it is final
        report, outputs, died = run_notebook(cells, record["lab"], salt, opts)
    except (ValueError, RuntimeError) as err:
        return _ungraded(record, str(err))
    except GradeError as err:  # it names a lab that does not exist
        return _ungraded(record | {"lab": None}, str(err))
    except Exception as err:  # noqa: BLE001 - a fault of the grader or the machine: say so, go on, retry next time
        return _ungraded(record, f"not graded, the grader failed: {type(err).__name__}: {err}") | {"final": False}
    no_credit, where = static_checks(cells, checks.LAB.exercises)
    expected = collect(checks, salt)

    def label(k: int) -> str:  # "code cell 7 (`import os`)": the number alone is hard to find in Jupyter
        first = next((s.strip() for s in cells[k - 1].split("\n") if s.strip() and not s.strip().startswith("#")), "")
        return f"code cell {k} (`{first[:40]}`)"

    record.update(title=checks.LAB.title, notes=[f"{label(k)}: {why}" for k, why in sorted(report["cells"].items())])
    for number, name in enumerate(checks.LAB.exercises, 1):
        defined, cell_error = report["defined"].get(name), report["cells"].get(where.get(name))
        near = difflib.get_close_matches(name, report["functions"], n=1, cutoff=0.5)
        if name in no_credit or name in died:
            status, reason = FAIL, no_credit.get(name) or died[name]
        elif defined is None:
            status, reason = MISSING, f"no function named `{name}` in the notebook" + (
                f": its cell, {label(where[name])}, stopped before defining it: {cell_error}" if cell_error
                else f" (found `{near[0]}`: keep the name the lab gives)" if near else "")
        elif defined != "function" and name not in outputs:
            status, reason = FAIL, f"expected a function, got {defined}"
        else:
            _, cases, atol = expected[name]
            status, reason = score(cases, atol, outputs.get(name, [["error", "no output (did the notebook change the grader?)"]]))
        max_points = checks.LAB.points[name]
        record["rows"].append(dict(student=student, lab=record["lab"], number=number, exercise=name,
                                   points=max_points if status == PASS else 0.0, max_points=max_points, status=status, reason=reason))
    return record


def _ungraded(record: dict, reason: str) -> dict:
    """The record with status ERROR for every exercise of its lab (one row when the lab is unknown)."""
    checks = lab_checks(record["lab"]) if record["lab"] else None
    points = checks.LAB.points if checks else {"-": 0.0}
    record.update(title=checks.LAB.title if checks else None, rows=[
        dict(student=record["student"], lab=record["lab"] or "", number=i if checks else "", exercise=name, points=0.0,
             max_points=max_points, status=ERROR, reason=reason) for i, (name, max_points) in enumerate(points.items(), 1)])
    return record


def feedback(record: dict, opts) -> str:
    """The text a student gets."""
    rows = record["rows"]
    lines = [f"{record['title'] or 'Lab ?'}: {record['student']} ({record['file']})",
             f"{sum(r['points'] for r in rows):g}/{sum(r['max_points'] for r in rows):g} points", ""]
    lines += [f"[{r['status']}] Exercise {r['number']} {r['exercise']}: {r['reason']}" for r in rows]
    if record["notes"]:
        lines += ["", "While your notebook ran:"] + [f"- {note}" for note in record["notes"]]
    how = (f"How this was graded: your notebook ran from top to bottom in a fresh kernel (at most {opts.timeout:g} s per cell, "
           f"{opts.memory:g} GB of memory), then each exercise's function was checked on cases of the same shapes as in your "
           "notebook but with new random values, so the numbers can differ from the ones your notebook printed.")
    return "\n".join(lines + [""] + textwrap.wrap(how, 100)) + "\n"


def _write(path: Path, text: str) -> None:
    """Write atomically: a reader, or a crash, sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_gradebook(out: Path, records: dict, settings: dict) -> None:
    records = [records[student] for student in sorted(records)]
    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "points": f"{row['points']:g}", "max_points": f"{row['max_points']:g}"} for r in records for row in r["rows"])
    _write(out / "gradebook.csv", text.getvalue())
    _write(out / "gradebook.json", json.dumps({"grader": VERSION, "settings": settings, "submissions": records}, indent=1) + "\n")


def find_submissions(paths: list[Path], out: Path) -> list[tuple[str, Path, str]]:
    """(student, file, its path as shown) for every submission under `paths`, sorted by student.
    A student with several files gets a set of rows for each, named by folder and file."""
    found = {}  # file -> (student, path shown, longer name)
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts) and out.resolve() not in f.resolve().parents:
                    found.setdefault(f.resolve(), (rel.parts[0] if len(rel.parts) > 1 else f.stem, f, str(rel), rel.with_suffix("").as_posix()))
        elif p.is_file():
            found.setdefault(p.resolve(), (p.stem, p, str(p), f"{p.resolve().parent.name}/{p.stem}"))
        else:
            raise GradeError(f"{p}: no such file or folder")
    if not found:
        raise GradeError(f"no submissions in {', '.join(map(str, paths))}")
    counts = Counter(student for student, *_ in found.values())
    return sorted((s if counts[s] == 1 else longer, f, shown) for s, f, shown, longer in found.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m course_lib.grade", description=__doc__.split("\n")[0])
    p.add_argument("submissions", nargs="+", type=Path, help="notebook files, or folders of them")
    p.add_argument("--lab", help="the lab of every submission, e.g. 01 (default: read from each notebook)")
    p.add_argument("--out", type=Path, default=Path("gradebook"), help="where to write the gradebook (default gradebook/)")
    p.add_argument("--timeout", type=float, default=60, help="seconds for each cell and each exercise (default 60)")
    p.add_argument("--total", type=float, default=900, help="seconds for a whole submission (default 900)")
    p.add_argument("--memory", type=float, default=4, help="GB of memory for each submission (default 4)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    p.add_argument("--regrade", action="store_true", help="grade every submission again, even unchanged ones")
    opts = p.parse_args(argv)
    try:
        if min(opts.timeout, opts.total, opts.memory, opts.jobs) <= 0:
            raise GradeError("--timeout, --total, --memory and --jobs must be positive")
        if opts.memory < 1:
            raise GradeError("--memory must be at least 1 (GB): a kernel with torch imported takes about 0.7 GB")
        opts.lab = lab_checks(opts.lab).__name__[-2:] if opts.lab else None
        if opts.out.exists() and not opts.out.is_dir():
            raise GradeError(f"--out {opts.out} is a file: give a folder")
        submissions = find_submissions(opts.submissions, opts.out)
    except GradeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings = {"lab": opts.lab, "timeout": opts.timeout, "total": opts.total, "memory_gb": opts.memory}
    (opts.out / "feedback").mkdir(parents=True, exist_ok=True)
    previous = {}  # (student, sha256) -> record, from the last run with the same grader and settings
    try:
        book = json.loads((opts.out / "gradebook.json").read_text())
        if book["grader"] == VERSION and book["settings"] == settings and not opts.regrade:
            previous = {(r["student"], r["sha256"]): r for r in book["submissions"] if r.get("final", True)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    labs = Counter()  # the labs of the batch: a file that cannot tell its own gets the batch's, if one
    for _, f, _ in submissions:
        try:
            code, markdown = read_notebook(f.read_bytes())
            labs[identify_lab("\n".join(code), markdown, f.name)] += 1
        except ValueError:
            pass
    labs.pop(None, None)
    batch_lab = next(iter(labs)) if len(labs) == 1 else None
    records, lock = {}, threading.Lock()

    def one(student: str, f: Path, shown: str) -> None:
        old = previous.get((student, hashlib.sha256(f.read_bytes()).hexdigest()))
        record = dict(old, file=shown) if old else grade(f, student, shown, opts, batch_lab)
        with lock:
            records[student] = record
            _write(opts.out / "feedback" / f"{student.replace('/', '__')}.txt", feedback(record, opts))
            write_gradebook(opts.out, records, settings)
            rows = record["rows"]
            print(f"{student}: {sum(r['points'] for r in rows):g}/{sum(r['max_points'] for r in rows):g} points"
                  f" ({record['title'] or 'lab unknown'}){' (unchanged)' if old else ''}", flush=True)

    with ThreadPoolExecutor(opts.jobs) as pool:
        for future in [pool.submit(one, *s) for s in submissions]:
            future.result()
    print(f"wrote {opts.out / 'gradebook.csv'}, {opts.out / 'gradebook.json'} and {len(records)} feedback files in {opts.out / 'feedback'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

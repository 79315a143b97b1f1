"""Grade students' lab notebooks: a gradebook (CSV and JSON) and a feedback text for each student.

    python -m course_lib.grade submissions/ --out gradebook/    # a folder (what `make grade` runs)
    python -m course_lib.grade alice.ipynb bob.ipynb --lab 01   # files; --lab when a notebook can't tell

Submissions. In a folder every file counts (a PDF or an empty file handed in instead of the notebook
gets a row that says so), except hidden ones: `alice.ipynb` is student "alice", and so is
`alice/anything.ipynb` (one folder per student). The lab is read from the notebook (its
`course_lib.checks import lab01` line, else its `# Lab 01` title, else the file name); --lab overrides.

How one submission is graded, so that nothing in it can grade itself:
1. Its code cells run in order in a fresh IPython shell (what a Jupyter kernel runs) in a process of
   its own, with a memory limit (--memory) and a time limit for each cell (--timeout). A cell that
   raises, loops or runs out of memory is stopped and the next cells run, as in Jupyter; a cell that
   kills the process, or that does not stop, is skipped on a rerun.
2. In that process each exercise's function, found by its name (`patchify`), is called on the
   cases of its check, with the same time limit, and only its outputs are kept.
3. This process, which never runs student code, builds the same cases, computes the expected
   outputs with course_lib and compares. The cases have the shapes of the notebook's check cells
   but new random values (the seeds are offset by a number taken from the submission's hash), so
   outputs copied into the notebook fail, and whatever the notebook does to course_lib, torch or its
   check cells only changes its own process. A notebook that assigns to course_lib or the checks (or
   to torch's comparisons) gets no credit for the exercises it targets, all of them if it names none;
   an exercise that uses course_lib gets none either: the labs ask for torch only.

Output (--out, default gradebook/): gradebook.csv and gradebook.json with one row per student and
exercise (points, status PASS/FAIL/TODO/MISSING/ERROR, reason), and feedback/STUDENT.txt. Each file
is replaced atomically after every submission; submissions are only read. A rerun grades only the
submissions whose bytes, or the grader's version or settings, changed (--regrade: all of them), so
an interrupted batch resumes and a finished one comes out the same, byte for byte.
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
import os
import pkgutil
import multiprocessing
import re
import resource
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

from . import checks as checks_package
from .checks import FAIL, PASS, TODO, CheckFailed, compare

VERSION = "1"  # part of every record: a new version regrades everything
MISSING, ERROR = "MISSING", "ERROR"
FIELDS = ["student", "lab", "number", "exercise", "points", "max_points", "status", "reason"]
SETUP_S = 120  # for the worker to import torch and build the cases, before any student code
GRACE_S = 5  # a step still running this long past its time limit is killed
_collect_lock = threading.Lock()
# Under `python -m course_lib.grade`, each worker re-imports this module as its __main__ (see
# multiprocessing's forkserver), and runpy warns that it is already imported: it is, on purpose.
warnings.filterwarnings("ignore", "'course_lib.grade' found in sys.modules", RuntimeWarning)


class GradeError(Exception):
    """A problem with the command line: printed, exit status 1."""


# ---------------------------------------------------------------------------------------- labs


def lab_checks(number: str) -> ModuleType:
    """The check module of a lab: '1' or '01' -> course_lib.checks.lab01."""
    known = sorted(m.name[3:] for m in pkgutil.iter_modules(checks_package.__path__) if m.name.startswith("lab"))
    name = f"{int(number):02d}" if str(number).isdigit() else str(number)
    if name not in known:
        raise GradeError(f"there is no lab {number!r}: the labs are {', '.join(known)}")
    return importlib.import_module(f"course_lib.checks.lab{name}")


def identify_lab(code: str, markdown: str, filename: str) -> str | None:
    """The lab number a notebook is for, from its check import, its title or its file name."""
    for pattern, text in [(r"checks\s+import\s+lab(\d+)|checks\.lab(\d+)", code), (r"^#\s*Lab\s+(\d+)\b", markdown), (r"lab[ _-]?(\d+)", filename.lower())]:
        m = re.search(pattern, text, flags=re.M)
        if m:
            return f"{int(next(g for g in m.groups() if g)):02d}"
    return None


def read_notebook(data: bytes) -> tuple[list[str], str]:
    """The code cells and the markdown text of a notebook file (format 4, or 3 from before 2015).
    Raises ValueError saying what the file is instead."""
    if not data.strip():
        raise ValueError("empty file")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        kind = {b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive"}.get(data[:4], f"not valid JSON ({err})")
        raise ValueError(f"not a notebook: {kind}") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if cells is None and isinstance(nb, dict) and isinstance(nb.get("worksheets"), list):
        cells = [c for sheet in nb["worksheets"] for c in sheet.get("cells", [])]
    if not isinstance(cells, list):
        raise ValueError("not a notebook: JSON without cells")
    cells = [c for c in cells if isinstance(c, dict)]

    def text(cell: dict) -> str:
        value = cell.get("source", cell.get("input", ""))
        return "".join(value) if isinstance(value, list) else str(value)

    return [text(c) for c in cells if c.get("cell_type") == "code"], "\n".join(text(c) for c in cells if c.get("cell_type") == "markdown")


def collect(checks: ModuleType, salt: int, student=lambda name: None) -> dict:
    """Each exercise's (function, cases, atol), built by the lab's own check functions without running
    them: {exercise: ...}. The check functions draw their random values from `_gen(seed)`; here the
    seeds are offset by `salt` (0: the notebook's own cases). `student(name)` is what they wrap."""
    runs = {}
    with _collect_lock:  # the check modules are shared by the grading threads
        gen = checks._gen
        checks._gen = lambda seed: torch.Generator().manual_seed(seed + salt)
        checks.LAB.run = lambda name, fn, cases, atol=1e-5: runs.__setitem__(name, (fn, list(cases), atol))  # Lab.run's default
        try:
            for name in checks.LAB.exercises:
                getattr(checks, name)(student(name))
        finally:
            checks._gen = gen
            del checks.LAB.run
    return runs


# ---------------------------------------------------------------- what reading the code tells


def static_checks(cells: list[str], exercises: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Read the code without running it. Returns {exercise: why it gets no credit} (the notebook
    changes course_lib, the checks or torch's comparisons, or the exercise uses course_lib) and
    {function: the code cell that defines it}, cells that do not compile included."""
    from IPython.core.inputtransformer2 import TransformerManager

    trees, where = [], {}
    for k, src in enumerate(cells, 1):
        where.update((name, k) for name in re.findall(r"^\s*def\s+(\w+)", src, flags=re.M))
        try:
            src = TransformerManager().transform_cell(src)  # `%pip ...` -> get_ipython().run_line_magic(...)
            trees.append((k, src, ast.parse(src)))
        except (SyntaxError, ValueError):
            pass  # the worker reports it
    imports = [node for _, _, tree in trees for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]

    def bound(package: str) -> set[str]:
        """The package's name and every name that an import from it binds."""
        names = {package}
        for node in imports:
            for alias in node.names:
                module = node.module if isinstance(node, ast.ImportFrom) else alias.name
                if (module or "").split(".")[0] == package:
                    names.add(alias.asname or alias.name.split(".")[0])
        return names

    def imports_course_lib(node: ast.AST) -> bool:
        return any((n.module or "").startswith("course_lib") if isinstance(n, ast.ImportFrom) else any(a.name.startswith("course_lib") for a in n.names)
                   for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))

    course, torch_names = bound("course_lib"), bound("torch")
    comparisons = {"allclose", "isclose", "equal", "eq", "__eq__", "testing"}
    no_credit: dict[str, str] = {}
    definitions: dict[str, ast.AST] = {}  # the last top-level statement that binds each name
    for k, src, tree in trees:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                definitions[node.name] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                definitions.update((a.asname or a.name.split(".")[0], node) for a in node.names)
            elif isinstance(node, ast.Assign):
                definitions.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
        for node in ast.walk(tree):  # assignments to course_lib, the checks or torch's comparisons
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and node.args:
                targets = [ast.Attribute(node.args[0], getattr(node.args[1], "value", "?") if len(node.args) > 1 else "?")]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in course:
                targets = [ast.Name(node.name)]  # `class checks: ...` replaces the checks
            else:
                continue
            for chain in map(_chain, targets):
                if chain and (chain[0] in course or chain[:2] == ["sys", "modules"] or (chain[0] in torch_names and comparisons & set(chain))):
                    line = (ast.get_source_segment(src, node) or ".".join(chain)).splitlines()[0][:60]
                    why = f"no credit: the notebook changes {'.'.join(map(str, chain))} (code cell {k}: `{line}`)"
                    for name in [n for n in exercises if n in chain] or exercises:
                        no_credit.setdefault(name, why)
    for name in exercises:  # an exercise that calls course_lib instead of doing the work
        node = definitions.get(name)
        uses = [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in course] if node else []
        if uses or (node and imports_course_lib(node)):
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


# ---------------------------------------------------- the worker process: runs the student's code


class _Timeout(BaseException):
    """Raised in the student's code at the time limit; not an Exception, so `except Exception` in
    that code does not swallow it (and it fires again every second in case a bare `except:` does)."""


_deadline = [0.0]


def _on_alarm(signum, frame):
    if _deadline[0] and time.monotonic() >= _deadline[0]:
        raise _Timeout()


def _limit(seconds: float) -> None:
    """Arm the time limit (0 disarms it)."""
    _deadline[0] = time.monotonic() + seconds if seconds else 0.0
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0 if seconds else 0)


def _describe(err: BaseException, timeout: float, memory_gb: float) -> str:
    """One line about an exception from the student's code, as the checks word it."""
    if isinstance(err, _Timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
        return f"ran out of memory (the limit is {memory_gb:g} GB): {type(err).__name__}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith("<ipython-input")]  # the notebook's lines
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
    for kind in (bool, int, float, str, type(None)):
        if isinstance(x, kind):
            return x if x is None else kind(x)
    return {"unsupported type": type(x).__name__}


def _worker(job_path: str) -> None:
    """Run one notebook, then call its exercise functions; write their outputs to job['out']."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    os.setsid()  # a process group of its own: killing it kills what the notebook started too
    job = json.loads(Path(job_path).read_text())
    out, timeout = Path(job["out"]), job["timeout"]
    os.chdir(out)
    os.environ.update(MPLBACKEND="Agg", IPYTHONDIR=str(out / "ipython"))
    log = os.open(out / "log.txt", os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1), os.dup2(log, 2)
    limit = int(job["memory_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # soft and hard: the notebook cannot raise it
    progress = out / "progress"
    progress.write_text("setup")
    torch.set_num_threads(1)
    checks = lab_checks(job["lab"])
    runs = collect(checks, job["salt"], lambda name: lambda *args, **kwargs: shell.user_ns[name](*args, **kwargs))
    config = Config()
    config.HistoryManager.enabled, config.InteractiveShell.colors = False, "nocolor"
    shell = InteractiveShell.instance(config=config)
    signal.signal(signal.SIGALRM, _on_alarm)
    report = {"cells": {}}
    for k, src in enumerate(job["cells"], 1):
        if k in job["skip_cells"]:
            continue
        progress.write_text(f"cell {k}")
        try:
            _limit(timeout)
            result = shell.run_cell(src, store_history=False)
            err = result.error_before_exec or result.error_in_exec
        except _Timeout as timed_out:  # fired again while IPython was reporting the first one
            err = timed_out
        finally:
            _limit(0)
        if err is not None:
            report["cells"][k] = _describe(err, timeout, job["memory_gb"])
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
            _limit(timeout)
            for case in cases:
                try:
                    outputs.append(["ok", _plain(fn(*case.args, **case.kwargs))])
                except NotImplementedError:
                    outputs.append(["todo"])
                except BaseException as err:  # noqa: BLE001 - the time limit and SystemExit included
                    outputs.append(["error", _describe(err, timeout, job["memory_gb"])])
                if outputs[-1][0] != "ok":
                    break
        except _Timeout:  # between two cases
            outputs.append(["error", f"timed out after {timeout:g} s"])
        finally:
            _limit(0)
        torch.save(outputs, out / f"{name}.pt")
    progress.write_text("done")


# ----------------------------------------------------------- this process: run, compare, record


def run_notebook(cells: list[str], lab: str, salt: int, opts) -> tuple[dict, dict, dict]:
    """Run a notebook in worker processes. Returns the worker's report, {exercise: outputs} and
    {exercise: why it was not run}. A step that kills the worker, or that does not stop, is skipped
    on a rerun (at most three)."""
    skip_cells: dict[int, str] = {}
    skip_exercises: dict[str, str] = {}
    context = multiprocessing.get_context("forkserver")  # workers fork from a clean process that imported torch once
    context.set_forkserver_preload(["course_lib.grade", "IPython.core.interactiveshell"])
    start = time.monotonic()
    for _ in range(4):
        attempt = time.time()
        with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
            tmp = Path(tmp)
            job = dict(cells=cells, lab=lab, salt=salt, timeout=opts.timeout, memory_gb=opts.memory, out=str(tmp),
                       skip_cells=sorted(skip_cells), skip_exercises=sorted(skip_exercises))
            (tmp / "job.json").write_text(json.dumps(job))
            proc = context.Process(target=importlib.import_module("course_lib.grade")._worker, args=(str(tmp / "job.json"),))
            proc.start()
            why = None
            while why is None and proc.is_alive():
                proc.join(0.2)
                step, since = _progress(tmp, attempt)
                if time.monotonic() - start > opts.total:
                    why = f"the whole notebook ran past {opts.total:g} s"
                elif step == "setup" and time.time() - since > SETUP_S:
                    why = f"the kernel did not start within {SETUP_S} s"
                elif step != "setup" and time.time() - since > opts.timeout + GRACE_S:
                    why = f"timed out after {opts.timeout:g} s"
            _kill(proc)  # and whatever the student's code started
            step, _ = _progress(tmp, attempt)
            if step == "done":
                report = json.loads((tmp / "report.json").read_text())
                report["cells"] = {int(k): v for k, v in report["cells"].items()} | skip_cells
                outputs = {}
                for name in report["defined"]:
                    try:
                        outputs[name] = torch.load(tmp / f"{name}.pt", weights_only=True)  # tensors and plain data only
                    except Exception:  # noqa: BLE001 - not written, or not what the worker writes
                        pass
                return report, outputs, skip_exercises
            if why is None:  # it died
                tail = (tmp / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                rc = proc.exitcode
                why = f"the kernel died ({f'signal {-rc}' if rc < 0 else f'exit code {rc}'}{', out of memory?' if rc == -9 else ''})"
                if step == "setup":
                    why += f": {tail[0][:200]}"
            if step.startswith("cell ") and "whole notebook" not in why:
                skip_cells[int(step[5:])] = f"{why}; skipped on a rerun"
            elif step.startswith("exercise ") and "whole notebook" not in why:
                skip_exercises[step[9:]] = f"{why} while running it"
            else:
                raise RuntimeError(why)
    raise RuntimeError("the notebook kept stopping the kernel: gave up after four runs")


def _progress(tmp: Path, started: float) -> tuple[str, float]:
    """The worker's current step and when it started (`started`, until the worker says)."""
    try:
        path = tmp / "progress"
        return path.read_text(), path.stat().st_mtime
    except OSError:
        return "setup", started


def _kill(proc: multiprocessing.Process) -> None:
    """Stop a worker and whatever the notebook started (they share the worker's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # no group: it died before making one, or nothing is left
        pass
    if proc.is_alive():
        proc.kill()
    proc.join()


def score(cases: list, atol: float, outputs: list) -> tuple[str, str]:
    """(status, reason) for one exercise, the way Lab.run words it."""
    for i, case in enumerate(cases, 1):
        where = f"case {i} ({case.description})"
        kind, *value = outputs[i - 1] if i <= len(outputs) else ["error", "no output"]
        if kind == "todo":
            return TODO, "not done yet (it raises NotImplementedError)"
        if kind == "error":
            return FAIL, f"{where}: {value[0]}"
        got = value[0]
        if isinstance(got, dict) and set(got) == {"unsupported type"}:
            got = type(got["unsupported type"], (), {})()  # compare() then names the type
        try:
            compare(got, case.expected, atol=atol)
        except CheckFailed as err:
            return FAIL, f"{where}: {err}"
        except Exception as err:  # noqa: BLE001 - an output compare() cannot handle
            return FAIL, f"{where}: its output cannot be compared ({type(err).__name__})"
    return PASS, f"{len(cases)}/{len(cases)} cases"


def grade(path: Path, student: str, rel: str, opts, batch_lab: str | None = None) -> dict:
    """Grade one file: its record, with one row per exercise."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    record = {"student": student, "file": rel, "sha256": sha, "lab": None, "title": None, "notes": [], "rows": []}
    try:
        cells, markdown = read_notebook(data)
        lab = opts.lab or identify_lab("\n".join(cells), markdown, path.name) or batch_lab
        if lab is None:
            raise ValueError("cannot tell which lab this notebook is for: grade it with --lab NN")
    except ValueError as err:
        return _ungraded(record, opts.lab or batch_lab, str(err))
    checks = lab_checks(lab)
    record.update(lab=lab, title=checks.LAB.title)
    salt = int(sha[:12], 16)  # hidden values: the notebook cannot know them before it is final
    try:
        report, outputs, died = run_notebook(cells, lab, salt, opts)
    except RuntimeError as err:
        return _ungraded(record, lab, str(err))
    except Exception as err:  # noqa: BLE001 - a fault of the grader or the machine: say so, go on, retry next run
        return _ungraded(record, lab, f"not graded, the grader failed: {type(err).__name__}: {err}") | {"final": False}
    no_credit, where = static_checks(cells, checks.LAB.exercises)
    expected = collect(checks, salt)
    def label(k: int) -> str:  # "code cell 7 (`import os`)": the number alone is hard to find in Jupyter
        first = next((s.strip() for s in cells[k - 1].splitlines() if s.strip() and not s.strip().startswith("#")), "")
        return f"code cell {k} (`{first[:40]}`)"

    record["notes"] = [f"{label(k)}: {why}" for k, why in sorted(report["cells"].items())]
    for number, name in enumerate(checks.LAB.exercises, 1):
        defined = report["defined"].get(name)
        if name in no_credit:
            status, reason = FAIL, no_credit[name]
        elif name in died:
            status, reason = FAIL, died[name]
        elif defined is None:
            near = difflib.get_close_matches(name, report["functions"], n=1, cutoff=0.5)
            cell_error = report["cells"].get(where.get(name))
            status, reason = MISSING, f"no function named `{name}` in the notebook" + (
                f": its cell, {label(where[name])}, stopped before defining it: {cell_error}" if cell_error
                else f" (found `{near[0]}`: keep the name the lab gives)" if near else "")
        elif defined != "function" and name not in outputs:
            status, reason = FAIL, f"expected a function, got {defined}"
        else:
            _, cases, atol = expected[name]
            status, reason = score(cases, atol, outputs.get(name, [["error", "no output (the notebook changed the grader's tools?)"]]))
        max_points = checks.LAB.points[name]
        record["rows"].append(dict(student=student, lab=lab, number=number, exercise=name, points=max_points if status == PASS else 0.0,
                                   max_points=max_points, status=status, reason=reason))
    return record


def _ungraded(record: dict, lab: str | None, reason: str) -> dict:
    """A record whose every exercise (or one row, when the lab is unknown) has status ERROR."""
    checks = lab_checks(lab) if lab else None
    exercises = checks.LAB.exercises if checks else ["-"]
    record.update(lab=lab, title=checks.LAB.title if checks else None)
    record["rows"] = [dict(student=record["student"], lab=lab or "", number=i if checks else "", exercise=name, points=0.0,
                           max_points=checks.LAB.points[name] if checks else 0.0, status=ERROR, reason=reason)
                      for i, name in enumerate(exercises, 1)]
    return record


def feedback(record: dict, opts) -> str:
    rows = record["rows"]
    points, total = sum(r["points"] for r in rows), sum(r["max_points"] for r in rows)
    lines = [f"{record['title'] or 'Lab ?'}: {record['student']} ({record['file']})", f"{points:g}/{total:g} points", ""]
    lines += [f"[{r['status']}] Exercise {r['number']} {r['exercise']}: {r['reason']}" for r in rows]
    if record["notes"]:
        lines += ["", "While your notebook ran:"] + [f"- {note}" for note in record["notes"]]
    how = (f"How this was graded: your notebook ran from top to bottom in a fresh kernel (at most {opts.timeout:g} s per cell, "
           f"{opts.memory:g} GB of memory), then each exercise's function was checked on cases of the same shapes as in your "
           "notebook but with new random values, so the numbers can differ from the ones your notebook printed.")
    return "\n".join(lines + [""] + textwrap.wrap(how, 100)) + "\n"


def _write(path: Path, text: str) -> None:
    """Write atomically: a reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_gradebook(out: Path, records: dict, settings: dict) -> None:
    records = [records[s] for s in sorted(records)]
    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "points": f"{row['points']:g}", "max_points": f"{row['max_points']:g}"} for r in records for row in r["rows"])
    _write(out / "gradebook.csv", text.getvalue())
    _write(out / "gradebook.json", json.dumps({"grader": VERSION, "settings": settings, "submissions": records}, indent=1) + "\n")


def find_submissions(paths: list[Path], out: Path) -> list[tuple[str, Path, str]]:
    """(student, file, its path as shown) for every submission under `paths`, sorted by student.
    A student with several files gets one set of rows for each, named by folder and file."""
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
    p = argparse.ArgumentParser(prog="python -m course_lib.grade", description=__doc__.splitlines()[0])
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
        opts.lab = lab_checks(opts.lab).__name__[-2:] if opts.lab else None
        if opts.out.exists() and not opts.out.is_dir():
            raise GradeError(f"--out {opts.out} is a file: give a folder")
        submissions = find_submissions(opts.submissions, opts.out)
    except GradeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings = {"lab": opts.lab, "timeout": opts.timeout, "total": opts.total, "memory_gb": opts.memory}
    (opts.out / "feedback").mkdir(parents=True, exist_ok=True)
    previous = {}
    try:
        book = json.loads((opts.out / "gradebook.json").read_text())
        if book["grader"] == VERSION and book["settings"] == settings and not opts.regrade:
            previous = {(r["student"], r["sha256"]): r for r in book["submissions"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    labs = Counter()  # the batch's lab, for files that cannot tell theirs
    for _, f, _ in submissions:
        try:
            code, markdown = read_notebook(f.read_bytes())
            labs[identify_lab("\n".join(code), markdown, f.name)] += 1
        except ValueError:
            pass
    labs.pop(None, None)
    batch_lab = labs.most_common(1)[0][0] if len(labs) == 1 else None
    records, lock = {}, threading.Lock()

    def one(student: str, f: Path, rel: str) -> None:
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        old = previous.get((student, sha))
        old = dict(old, file=rel) if old and old.get("final", True) else None
        record = old or grade(f, student, rel, opts, batch_lab)
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

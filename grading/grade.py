"""Grade students' lab notebooks: a gradebook (CSV and JSON) and a feedback text for each file.

    python -m grading.grade submissions/ --out gradebook/    # a folder (what `make grade` runs)
    python -m grading.grade alice.ipynb bob.ipynb --lab 01   # files; --lab when a notebook can't tell

Submissions. In a folder every file counts, except hidden ones, so that a PDF or an empty file
handed in instead of the notebook gets rows that say so. A file's key (the "student" column) is
its path relative to the folder: `alice.ipynb`, `alice.pdf`, `bob/lab01.ipynb` are three keys,
never one overwriting another. Symbolic links, and anything that is not a plain file, are refused
with a reason. The lab is read from the notebook (its `grading.checks import vit` line, else its
`# Lab 01` title, else the file name).

How one submission is graded, so that nothing in it can grade itself:
1. This process builds the lab's hidden cases (the notebook's shapes, new random values: the
   seeds are offset by a number taken from the submission's hash) and computes their expected
   outputs with the course's references. Neither the expected outputs nor the salt leave it.
2. A worker (`grading.worker`) runs in a sandbox (`grading.sandbox`: bubblewrap, no network, its
   own PID namespace, read-only system and course, no view of other submissions or of the
   gradebook, one memory and process budget): it gets the cells and the cases' inputs, runs the
   cells in a fresh IPython shell with a time limit per cell, the course's answers to the lab
   unreachable the whole time (`grading.guard`), then calls each exercise's function on the
   inputs and sends back only the outputs. A cell that raises, loops or runs out of memory is
   stopped and the next cells run, as in Jupyter; a cell that kills the worker, or that does not
   stop, is skipped on a rerun.
3. The outputs are untrusted: size, archive, types and structure are checked before they are
   loaded (`weights_only`); then compared here. Anything wrong with one submission becomes its
   rows, with a reason; the batch goes on. Reading the code adds: a notebook that assigns to
   course_lib, the checks or torch's comparisons gets no credit for the exercises it targets, nor
   does an exercise whose code uses course_lib.

Output (--out, default gradebook/): gradebook.csv and gradebook.json, one row per file and
exercise (points, status PASS/FAIL/TODO/MISSING/ERROR, reason), and feedback/KEY.txt, each replaced
atomically after every submission; submissions are only read. A rerun grades only the files whose
bytes, or the grader's version or settings, changed (--regrade: all of them), so an interrupted
batch (Ctrl-C stops it at once) resumes and a finished one comes out the same, byte for byte.
Linux; without bubblewrap (`bwrap`) it refuses to run unless given --unsafe-no-sandbox.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import itertools
import json
import os
import re
import signal
import stat
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import sandbox
from .static import static_checks
from .checks import FAIL, LECTURES, PASS, TODO, CheckFailed, compare, lab_module

VERSION = "2"  # kept in the gradebook: a new version grades everything again
MISSING, ERROR = "MISSING", "ERROR"
FIELDS = ["student", "lab", "number", "exercise", "points", "max_points", "status", "reason"]
SETUP_S, GRACE_S = 120, 5  # for a worker to start; past its time limit, before a step is killed
MAX_FILE = 50 * 2**20  # a submission larger than this is not read
MAX_RESULT = 64 * 2**20  # a worker's result larger than this is refused unread
STOP = threading.Event()  # set by Ctrl-C: every worker is killed, nothing more is recorded
_names = itertools.count()


class GradeError(Exception):
    """A problem with the command line: printed, exit status 1."""


class Interrupted(Exception):
    """The batch was stopped (Ctrl-C): this submission gets no record, a rerun grades it."""


# ----------------------------------------------------------------------- labs and their files


def lab_checks(number: str):
    """The check module of a lab: '1', '01' or 'vit' -> grading.checks.vit."""
    try:
        return lab_module(str(number))
    except KeyError as err:
        raise GradeError(err.args[0]) from None


def identify_lab(code: str, markdown: str, filename: str) -> str | None:
    """The lab a notebook is for, from its check import, else its title, else its file name."""
    m = re.search(r"grading\.checks\s+import\s+(\w+)|grading\.checks\.(\w+)", code)
    name = m and (m.group(1) or m.group(2))
    if name in LECTURES:
        return f"{LECTURES.index(name) + 1:02d}"
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
    kind = {b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive"}.get(data[:4])
    if kind:
        raise ValueError(f"not a notebook: {kind}")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not a notebook: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError("not a notebook: JSON nested too deeply to read") from None
    cells = None
    if isinstance(nb, dict):
        cells = nb.get("cells") if "cells" in nb else nb.get("worksheets")  # format 4, 3
        if "cells" not in nb and isinstance(cells, list):
            cells = [c for sheet in cells if isinstance(sheet, dict) and isinstance(sheet.get("cells"), list) for c in sheet["cells"]]
    if not isinstance(cells, list):
        raise ValueError("not a notebook: JSON without cells")

    def text(cell: dict) -> str:
        value = cell.get("source", cell.get("input", ""))  # format 3 calls code "input"
        return "".join(v if isinstance(v, str) else "" for v in value) if isinstance(value, list) else value if isinstance(value, str) else ""

    cells = [c for c in cells if isinstance(c, dict)]
    return [text(c) for c in cells if c.get("cell_type") == "code"], "\n".join(text(c) for c in cells if c.get("cell_type") == "markdown")


# ------------------------------------------------------------- running a notebook in the sandbox


_running: set = set()  # (process, budget) of the workers now running: Ctrl-C kills them
_running_lock = threading.Lock()


class _Channel:
    """Reads the worker's standard output, untrusted: progress lines, then one result of at most
    MAX_RESULT bytes. Anything else ends the reading with `problem` set."""

    def __init__(self, stream, started: float):
        self.step, self.since, self.result, self.problem = "setup", started, None, None
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        try:
            while True:
                line = stream.readline(1000)
                if not line:
                    return
                message = json.loads(line) if line.endswith(b"\n") else None
                if isinstance(message, dict) and isinstance(message.get("step"), str) and len(message) == 1:
                    self.step, self.since = message["step"][:100], time.time()
                elif isinstance(message, dict) and type(message.get("result")) is int and len(message) == 1:
                    if not 0 < message["result"] <= MAX_RESULT:
                        self.problem = f"its result is too large ({message['result'] / 2**20:.0f} MB; the limit is {MAX_RESULT // 2**20} MB)"
                        return
                    self.result = stream.read(message["result"])
                    return
                else:
                    self.problem = "it wrote something that is not the worker's report"
                    return
        except (ValueError, RecursionError, OSError):
            self.problem = "it wrote something that is not the worker's report"


def _tail(stream, keep: list) -> None:
    """Keep the last 4 kB of the worker's standard error (its own errors; not the student's)."""
    while chunk := stream.read(4096):
        keep[:] = [(b"".join(keep) + chunk)[-4096:]]


def load_result(data: bytes, exercises: list[str]) -> dict:
    """The worker's report, checked before and after loading. Raises ValueError saying what is wrong."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"its result is not the worker's ({type(err).__name__})") from None
    if len(members) > 10_000 or any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > len(data):
        raise ValueError("its result is not the worker's (an archive of another shape)")
    try:
        report = torch.load(io.BytesIO(data), weights_only=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - whatever the bytes are
        raise ValueError(f"its result could not be loaded ({type(err).__name__})") from None
    ok = (isinstance(report, dict) and set(report) == {"cells", "defined", "functions", "outputs"}
          and isinstance(report["cells"], dict) and all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in report["cells"].items())
          and isinstance(report["defined"], dict) and all(k in exercises and (v is None or isinstance(v, str)) for k, v in report["defined"].items())
          and isinstance(report["functions"], list) and all(isinstance(f, str) for f in report["functions"])
          and isinstance(report["outputs"], dict) and all(k in exercises and isinstance(v, list) and all(map(_valid_output, v))
                                                          for k, v in report["outputs"].items()))
    if not ok:
        raise ValueError("its result is not the worker's (unexpected contents)")
    report["cells"] = {int(k): v[:300] for k, v in report["cells"].items()}
    return report


def _valid_output(item) -> bool:
    if not isinstance(item, list) or not item or item[0] not in ("ok", "todo", "error"):
        return False
    if item[0] == "todo":
        return len(item) == 1
    return len(item) == 2 and (isinstance(item[1], str) if item[0] == "error" else _plain(item[1]))


def _plain(x, depth: int = 0) -> bool:
    """Whether x is what the worker sends: exact tensors, numbers, strings, None, short lists."""
    if type(x) is torch.Tensor or x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) in (list, tuple):
        return depth < 5 and len(x) <= 1000 and all(_plain(v, depth + 1) for v in x)
    return type(x) is dict and set(x) == {"unsupported type"} and isinstance(x["unsupported type"], str)


def run_notebook(cells: list[str], lab: str, inputs: dict, opts) -> tuple[dict, dict]:
    """Run a notebook in a sandboxed worker. Returns its report and {exercise: why it was not run}.
    A step that kills the worker, or does not stop, is skipped on a rerun. Raises RuntimeError
    when the submission cannot be graded, OSError when the machine fails, Interrupted on Ctrl-C."""
    skip_cells: dict[int, str] = {}
    skip_exercises: dict[str, str] = {}
    buffer = io.BytesIO()
    torch.save(inputs, buffer)
    start = time.monotonic()
    for _ in range(4):
        with tempfile.TemporaryDirectory(prefix="course-grade-", ignore_cleanup_errors=True) as tmp:
            job_dir = Path(tmp) / "job"
            job_dir.mkdir()
            job = dict(cells=cells, lab=lab, timeout=opts.timeout, memory_gb=opts.memory,
                       skip_cells=sorted(skip_cells), skip_exercises=sorted(skip_exercises))
            (job_dir / "job.json").write_text(json.dumps(job))
            os.chmod(tmp, 0o755)  # the unprivileged user inside reads the job
            budget = sandbox.Budget(f"course-grade-{os.getpid()}-{next(_names)}", int(opts.memory * 2**30))
            if STOP.is_set():
                budget.remove()
                raise Interrupted()
            try:
                if sandbox.forking(budget, opts.unsafe_no_sandbox):  # from this slot's preloaded zygote: no torch import
                    proc = sandbox.start_forked(budget, opts.scratch, SETUP_S)
                    data = json.dumps(job).encode() + b"\n" + buffer.getvalue()
                else:
                    proc, data = sandbox.start(job_dir, budget, opts.scratch, opts.unsafe_no_sandbox), buffer.getvalue()
            except BaseException:
                budget.remove()
                raise
            with _running_lock:
                _running.add((proc, budget))
            channel, errors = _Channel(proc.stdout, time.time()), [b""]
            threading.Thread(target=_tail, args=(proc.stderr, errors), daemon=True).start()
            threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True).start()
            why = None
            try:
                while why is None and proc.poll() is None and channel.result is None and channel.problem is None:
                    time.sleep(0.1)
                    limit = SETUP_S if channel.step == "setup" else opts.timeout
                    if STOP.is_set():
                        raise Interrupted()
                    if time.monotonic() - start > opts.total:
                        why = f"the whole notebook ran past {opts.total:g} s"
                    elif time.time() - channel.since > limit + GRACE_S:
                        why = f"timed out after {limit:g} s"
                channel.thread.join(timeout=30 if channel.result is None and why is None and channel.problem is None else 0)
            finally:
                sandbox.stop(proc, budget)  # and whatever the notebook started
                with _running_lock:
                    _running.discard((proc, budget))
            if STOP.is_set():
                raise Interrupted()
            if channel.problem:
                raise RuntimeError(channel.problem)
            if channel.result is not None:
                report = load_result(channel.result, list(inputs))
                report["cells"].update(skip_cells)  # what stopped the earlier runs
                return report, skip_exercises
            rc, step = proc.returncode, channel.step
            killed_by = -rc if rc < 0 else rc - 128 if rc > 128 else None  # bwrap exits with 128 + the signal
            why = why or f"the kernel died ({f'signal {killed_by}' if killed_by else f'exit code {rc}'}{', out of memory?' if killed_by == 9 else ''})"
            if step == "setup":  # before any student code
                last = errors[0].decode(errors="replace").strip().split("\n")[-1][:300]
                raise OSError(f"the worker failed to start: {why}" + (f": {last}" if last else ""))
            if "whole notebook" in why:
                raise RuntimeError(why)
            if step.startswith("cell ") and step[5:].isdigit():
                skip_cells[int(step[5:])] = f"{why}; skipped on a rerun"
            elif step.startswith("exercise ") and step[9:] in inputs:
                skip_exercises[step[9:]] = f"{why} while running it"
            else:
                raise RuntimeError(f"the notebook kept stopping the kernel ({why})")
    raise RuntimeError("the notebook kept stopping the kernel: gave up after four runs")


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except OSError:  # the worker died before reading it
        pass


def stop_all() -> None:
    """Ctrl-C: stop every running worker now."""
    STOP.set()
    with _running_lock:
        running = list(_running)
    for proc, budget in running:
        sandbox.stop(proc, budget)
    sandbox.close_zygotes()


# ------------------------------------------------------------- this process: compare, record


def score(cases: list, atol: float, outputs: list) -> tuple[str, str]:
    """(status, reason) for one exercise, worded as the notebook's check words it."""
    for i, case in enumerate(cases, 1):
        where = f"case {i} ({case.description})"
        kind, *value = outputs[i - 1] if i <= len(outputs) else ["error", "no output"]
        if kind == "todo":
            return TODO, "not done yet (it raises NotImplementedError)"
        if kind == "error":
            return FAIL, f"{where}: {value[0]}"
        got = value[0]
        if isinstance(got, dict) and set(got) == {"unsupported type"}:
            got = type(str(got["unsupported type"]), (), {})()  # so that compare() names its type
        try:
            compare(got, case.expected, atol=atol)
        except CheckFailed as err:
            return FAIL, f"{where}: {err}"
        except Exception as err:  # noqa: BLE001 - an output compare() cannot handle
            return FAIL, f"{where}: its output cannot be compared ({type(err).__name__})"
    return PASS, f"{len(cases)}/{len(cases)} cases"


def grade(data: bytes, key: str, opts, batch_lab: str | None = None, problem: str | None = None) -> dict:
    """Grade one file's bytes: its record, with one row per exercise. Never raises for a bad
    submission (Interrupted on Ctrl-C)."""
    sha = hashlib.sha256(data).hexdigest()
    record = {"student": key, "file": key, "sha256": sha, "lab": opts.lab or batch_lab, "title": None, "notes": [], "rows": []}
    try:
        if problem:
            raise ValueError(problem)
        cells, markdown = read_notebook(data)
        record["lab"] = opts.lab or identify_lab("\n".join(cells), markdown, Path(key).name) or batch_lab
        if record["lab"] is None:
            raise ValueError("cannot tell which lab this notebook is for: grade it with --lab NN")
        lab = lab_checks(record["lab"]).LAB
        salt = int(sha[:12], 16)  # new random values, which the notebook cannot know before it is final
        cases = {name: lab.cases(name, salt) for name in lab.exercises}
        report, died = run_notebook(cells, record["lab"], {n: [(c.args, c.kwargs) for c in cs] for n, cs in cases.items()}, opts)
        no_credit, where = static_checks(cells, list(lab.exercises))
    except Interrupted:
        raise
    except (ValueError, RuntimeError) as err:
        return _ungraded(record, str(err))
    except GradeError as err:  # it names a lab that does not exist
        return _ungraded(record | {"lab": None}, str(err))
    except Exception as err:  # noqa: BLE001 - a fault of the grader or the machine: say so, go on, retry next time
        return _ungraded(record, f"not graded, the grader failed: {type(err).__name__}: {err}") | {"final": False}

    def label(k: int) -> str:  # "code cell 7 (`import os`)": the number alone is hard to find in Jupyter
        first = next((s.strip() for s in cells[k - 1].split("\n") if s.strip() and not s.strip().startswith("#")), "") if k <= len(cells) else ""
        return f"code cell {k} (`{first[:40]}`)"

    record.update(title=lab.title, notes=[f"{label(k)}: {why}" for k, why in sorted(report["cells"].items())])
    for number, (name, exercise) in enumerate(lab.exercises.items(), 1):
        defined, cell_error = report["defined"].get(name), report["cells"].get(where.get(name))
        near = difflib.get_close_matches(name, report["functions"], n=1, cutoff=0.5)
        if name in no_credit or name in died:
            status, reason = FAIL, no_credit.get(name) or died[name]
        elif defined is None:
            status, reason = MISSING, f"no function named `{name}` in the notebook" + (
                f": its cell, {label(where[name])}, stopped before defining it: {cell_error}" if cell_error
                else f" (found `{near[0]}`: keep the name the lab gives)" if near else "")
        elif name not in report["outputs"]:
            status, reason = FAIL, f"expected a function, got {defined}"
        else:
            status, reason = score(cases[name], exercise.atol, report["outputs"][name])
        record["rows"].append(dict(student=key, lab=record["lab"], number=number, exercise=name,
                                   points=exercise.points if status == PASS else 0.0, max_points=exercise.points, status=status, reason=reason))
    return record


def _ungraded(record: dict, reason: str) -> dict:
    """The record with status ERROR for every exercise of its lab (one row when the lab is unknown)."""
    lab = lab_checks(record["lab"]).LAB if record["lab"] else None
    points = lab.points if lab else {"-": 0.0}
    record.update(title=lab.title if lab else None, rows=[
        dict(student=record["student"], lab=record["lab"] or "", number=i if lab else "", exercise=name, points=0.0,
             max_points=max_points, status=ERROR, reason=reason) for i, (name, max_points) in enumerate(points.items(), 1)])
    return record


def feedback(record: dict, opts) -> str:
    """The text a student gets."""
    rows = record["rows"]
    lines = [f"{record['title'] or 'Lab ?'}: {record['student']}",
             f"{sum(r['points'] for r in rows):g}/{sum(r['max_points'] for r in rows):g} points", ""]
    lines += [f"[{r['status']}] Exercise {r['number']} {r['exercise']}: {r['reason']}" for r in rows]
    if record["notes"]:
        lines += ["", "While your notebook ran:"] + [f"- {note}" for note in record["notes"]]
    how = (f"How this was graded: your notebook ran from top to bottom in a fresh kernel, isolated from everything else (at most "
           f"{opts.timeout:g} s per cell, {opts.memory:g} GB of memory), then each exercise's function was checked on cases of the "
           "same shapes as in your notebook but with new random values, so the numbers can differ from the ones your notebook "
           "printed. The course's own implementations cannot be called while your functions run.")
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


def feedback_name(key: str) -> str:
    """The feedback file of a key: `bob/lab01.ipynb` -> `bob__lab01.ipynb.txt` (shortened, with a
    hash, when a deep path would make too long a file name)."""
    name = key.replace("/", "__").replace("\0", "")
    if len(name.encode()) > 200:
        name = name[:100] + "-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return name + ".txt"


def find_submissions(paths: list[Path], out: Path) -> list[tuple[str, Path, str | None]]:
    """(key, file, why it is refused or None) for every submission under `paths`, sorted by key.
    The key is the path relative to the folder given (or the path as given, for a file)."""
    found: dict[str, tuple[Path, str | None]] = {}
    out = out.resolve()

    def add(key: str, path: Path) -> None:
        problem = None
        if path.is_symlink():
            problem = f"refused: a symbolic link (to {os.readlink(path)}); hand in the file itself"
        elif not path.is_file():
            problem = "refused: not a plain file"
        found.setdefault(key, (path, problem))

    for p in paths:
        if p.is_dir() and not p.is_symlink():
            for folder, dirs, files in os.walk(p):  # symbolic links to folders are not followed
                here = Path(folder)
                for d in [d for d in dirs if not d.startswith(".")]:
                    if (here / d).is_symlink():
                        add((here / d).relative_to(p).as_posix(), here / d)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink() and (here / d).resolve() != out)
                for f in sorted(files):
                    if not f.startswith("."):
                        add((here / f).relative_to(p).as_posix(), here / f)
        elif p.exists() or p.is_symlink():
            add(str(p), p)
        else:
            raise GradeError(f"{p}: no such file or folder")
    if not found:
        raise GradeError(f"no submissions in {', '.join(map(str, paths))}")
    return sorted((key, path, problem) for key, (path, problem) in found.items())


def read_file(path: Path) -> tuple[bytes, str | None]:
    """The bytes of a submission (not following links), or b"" and why it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return b"", "refused: not a plain file"
            if info.st_size > MAX_FILE:
                return b"", f"too large to be a lab notebook ({info.st_size / 2**20:.0f} MB; the limit is {MAX_FILE // 2**20} MB)"
            return f.read(MAX_FILE + 1), None
    except OSError as err:
        return b"", f"cannot be read: {err.strerror or err}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grading.grade", description=__doc__.split("\n")[0])
    p.add_argument("submissions", nargs="+", type=Path, help="notebook files, or folders of them")
    p.add_argument("--lab", help="the lab of every submission, e.g. 01 (default: read from each notebook)")
    p.add_argument("--out", type=Path, default=Path("gradebook"), help="where to write the gradebook (default gradebook/)")
    p.add_argument("--timeout", type=float, default=60, help="seconds for each cell and each exercise (default 60)")
    p.add_argument("--total", type=float, default=900, help="seconds for a whole submission (default 900)")
    p.add_argument("--memory", type=float, default=4, help="GB of memory for each submission, all its processes together (default 4)")
    p.add_argument("--scratch", type=int, default=256, help="MB of writable scratch space for each submission (default 256)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    p.add_argument("--regrade", action="store_true", help="grade every submission again, even unchanged ones")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="run the notebooks without bubblewrap: only for notebooks you trust")
    opts = p.parse_args(argv)
    try:
        if min(opts.timeout, opts.total, opts.memory, opts.jobs, opts.scratch) <= 0:
            raise GradeError("--timeout, --total, --memory, --scratch and --jobs must be positive")
        if opts.memory < 1:
            raise GradeError("--memory must be at least 1 (GB): a kernel with torch imported takes about 0.7 GB")
        if not sandbox.bwrap() and not opts.unsafe_no_sandbox:
            raise GradeError("bubblewrap (bwrap) is not installed, and students' notebooks must not run unisolated: "
                             "run `make grade-setup` (apt-get install bubblewrap), or pass --unsafe-no-sandbox for notebooks you trust")
        opts.lab = lab_checks(opts.lab).LAB.number if opts.lab else None
        if opts.out.exists() and not opts.out.is_dir():
            raise GradeError(f"--out {opts.out} is a file: give a folder")
        submissions = find_submissions(opts.submissions, opts.out)
    except GradeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    probe = sandbox.Budget(f"course-grade-{os.getpid()}-probe", 2**30)
    probe.remove()
    isolation = "none (--unsafe-no-sandbox)" if opts.unsafe_no_sandbox else f"bubblewrap ({sandbox.version()})"
    print(f"sandbox: {isolation}; memory and process budget: {probe.kind}", flush=True)
    settings = {"lab": opts.lab, "timeout": opts.timeout, "total": opts.total, "memory_gb": opts.memory, "scratch_mb": opts.scratch,
                "sandbox": isolation.split(" (")[0], "budget": probe.kind.split(" (")[0]}
    (opts.out / "feedback").mkdir(parents=True, exist_ok=True)
    previous = {}  # (key, sha256) -> record, from the last run with the same grader and settings
    try:
        book = json.loads((opts.out / "gradebook.json").read_text())
        if book["grader"] == VERSION and book["settings"] == settings and not opts.regrade:
            previous = {(r["student"], r["sha256"]): r for r in book["submissions"] if r.get("final", True)}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    files = {key: read_file(path) if problem is None else (b"", problem) for key, path, problem in submissions}
    labs = Counter()  # the labs of the batch: a file that cannot tell its own gets the batch's, if one
    for key, (data, problem) in files.items():
        try:
            code, markdown = read_notebook(data)
            labs[identify_lab("\n".join(code), markdown, Path(key).name)] += 1
        except Exception:  # noqa: BLE001 - it gets its rows when graded
            pass
    labs.pop(None, None)
    batch_lab = next(iter(labs)) if len(labs) == 1 else None
    records, lock = {}, threading.Lock()

    def one(key: str) -> None:
        data, problem = files[key]
        old = previous.get((key, hashlib.sha256(data).hexdigest()))
        try:
            record = old or grade(data, key, opts, batch_lab, problem)
        except Interrupted:
            return
        with lock:
            if STOP.is_set() and not old:
                return
            records[key] = record
            _write(opts.out / "feedback" / feedback_name(key), feedback(record, opts))
            write_gradebook(opts.out, records, settings)
            rows = record["rows"]
            print(f"{key}: {sum(r['points'] for r in rows):g}/{sum(r['max_points'] for r in rows):g} points"
                  f" ({record['title'] or 'lab unknown'}){' (unchanged)' if old else ''}", flush=True)

    STOP.clear()
    started = time.monotonic()
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if threading.current_thread() is threading.main_thread() else None
    pool = ThreadPoolExecutor(opts.jobs)
    try:
        futures = [pool.submit(one, key) for key in files]
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        print(f"interrupted: {len(records)} of {len(files)} files graded and recorded in {opts.out}; run the same command again to "
              "grade the rest", file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=True)
        sandbox.close_zygotes()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    print(f"wrote {opts.out / 'gradebook.csv'}, {opts.out / 'gradebook.json'} and {len(records)} feedback files in {opts.out / 'feedback'}"
          f" ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

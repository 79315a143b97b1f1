"""The grader (grading.grade) and the checks (grading.checks, grading.guard): reading and naming
submissions, the checks as data, the library failing every check, untrusted results, the
command line and the gradebook; then (marked `slow` or `notebook`: they start sandboxes) the
sandbox's budget, the crafted submissions in tests/submissions/ against
tests/expected_gradebook.csv, Ctrl-C, and every solution (full marks) and generated lab (zero)."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401 - a broken install fails here, not as skips
from make_submissions import EXPECTED, GRADE_ARGS, LEFTOVER, OUT

from grading import grade, guard, sandbox
from grading.checks import FAIL, LECTURES, PASS, all_labs, lab_module, vit

ROOT = Path(__file__).resolve().parents[1]
V4 = {"cells": [{"cell_type": "markdown", "source": ["# Lab 03: ConvNeXt"]}, {"cell_type": "code", "source": ["x = 1\n", "y = 2"]}],
      "nbformat": 4, "nbformat_minor": 5, "metadata": {}}
V3 = {"nbformat": 3, "worksheets": [{"cells": [{"cell_type": "code", "input": "x = 1", "language": "python"}]}]}
LABS = all_labs()
EXERCISES_OF_ALL_LABS = [(m.LAB.number, name) for m in LABS for name in m.LAB.exercises]


# ------------------------------------------------------------------------------- reading files


@pytest.mark.parametrize("data,expected", [
    (b"", "empty file"), (b" \n", "empty file"), (b"\x89PNG\r\n\x1a\n....", "not a notebook: a PNG image"),
    (b"%PDF-1.7", "not a notebook: a PDF"), (b"def f(): pass", "not a notebook: not valid JSON"),
    (b'{"name": "alice"}', "not a notebook: JSON without cells"), (b"[1, 2]", "not a notebook: JSON without cells"),
    (b"[" * 100_000 + b"]" * 100_000, "not a notebook: JSON nested too deeply"),
    (b'{"worksheets": 3}', "not a notebook: JSON without cells"),
])
def test_read_notebook_says_what_a_file_is_instead(data, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        grade.read_notebook(data)


def test_read_notebook_reads_format_4_and_format_3_and_odd_sources():
    assert grade.read_notebook(json.dumps(V4).encode()) == (["x = 1\ny = 2"], "# Lab 03: ConvNeXt")
    assert grade.read_notebook(json.dumps(V3).encode()) == (["x = 1"], "")
    odd = {"cells": [{"cell_type": "code", "source": [1, "x = 1", None]}, {"cell_type": "code", "source": 42}, 7,
                     {"cell_type": ["code"]}, {"cell_type": "markdown", "source": {"a": 1}}]}
    assert grade.read_notebook(json.dumps(odd).encode()) == (["x = 1", ""], "")


@pytest.mark.parametrize("code,markdown,filename,lab", [
    ("from grading.checks import swin as checks", "# Lab 05", "lab07.ipynb", "02"),
    ("grading.checks.mae.random_masking(random_masking)", "", "", "04"),
    ("from course_lib.checks import lab02 as checks", "# Lab 05", "lab07.ipynb", "02"),  # an older edition
    ("", "# Lab 3: ConvNeXt", "x.ipynb", "03"),
    ("", "", "Alice_Lab-06.ipynb", "06"),
    ("", "## lab 1", "alice.ipynb", None),
])
def test_identify_lab(code, markdown, filename, lab):
    assert grade.identify_lab(code, markdown, filename) == lab


def test_lab_checks_accepts_1_01_and_the_lecture_and_names_the_labs_otherwise():
    assert grade.lab_checks("1") is grade.lab_checks("01") is grade.lab_checks("vit") is vit
    with pytest.raises(grade.GradeError, match=r"there is no lab '9': the labs are 01 \(vit\), 02 \(swin\)"):
        grade.lab_checks("9")
    assert [m.__name__.rsplit(".", 1)[1] for m in LABS] == list(LECTURES)
    assert [m.LAB.number for m in LABS] == [f"{i:02d}" for i in range(1, 9)]


# ---------------------------------------------------------------------------- the checks as data


# Exercises whose hidden cases are the notebook's: masks and index tables have no random values.
SAME_CASES = {"shifted_window_mask", "relative_position_index", "itc_mask", "itm_mask", "itg_mask"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("module", LABS, ids=LECTURES)
def test_every_lab_exports_seeded_cases_that_travel_as_plain_data(module):
    """Each exercise's cases: at least three, the same on every call with salt 0 (the notebook's),
    the same shapes with new values under another salt, and inputs that weights_only loading accepts."""
    lab = module.LAB
    for name in lab.exercises:
        visible, again, hidden = lab.cases(name), lab.cases(name), lab.cases(name, salt=99)
        assert len(visible) >= 3 and all(_same(a.args, b.args) for a, b in zip(visible, again)), name
        assert [c.description for c in visible] == [c.description for c in hidden], name
        assert all(_same(a.args, b.args) for a, b in zip(visible, hidden)) == (name in SAME_CASES), name
        buffer = io.BytesIO()
        torch.save([(c.args, c.kwargs) for c in hidden], buffer)
        buffer.seek(0)
        assert _same(torch.load(buffer, weights_only=True), [(c.args, c.kwargs) for c in hidden]), name


@pytest.mark.parametrize("number,name", EXERCISES_OF_ALL_LABS, ids=[n for _, n in EXERCISES_OF_ALL_LABS])
def test_the_library_fails_every_check(number, name):
    """Issue 20: handing a check the course's own function (or the adapter around the library that
    computes the expected outputs) fails, saying why; the same computation outside a check gives
    exactly the expected outputs, so it is the guard that fails it, not a wrong answer."""
    lab = lab_module(number).LAB
    exercise, cases = lab.exercises[name], lab.cases(name, salt=7)
    for delegate in (exercise.reference, lambda *a, **k: exercise.reference(*a, **k)):  # directly, or through a helper
        status, reason = lab.outcome(name, delegate, cases)
        assert status == FAIL and "the course's own answer to this exercise" in reason, (name, reason)
    got = exercise.call(exercise.reference, *cases[-1].args, **cases[-1].kwargs)
    assert _same(got, cases[-1].expected)


def test_explicit_attention_rejects_sdpa_and_every_route_to_the_library():
    lab = vit.LAB
    cases = lab.cases("attention")

    def sdpa(q, k, v, mask=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def through_importlib(q, k, v, mask=None):
        import importlib

        return importlib.import_module("course" + "_lib.layers").attention(q, k, v, mask, use_sdpa=False)[0]

    def through_reload(q, k, v, mask=None):
        import importlib

        return importlib.reload(sys.modules["course_lib.layers"]).attention(q, k, v, mask, use_sdpa=False)[0]

    def hiding_the_refusal(q, k, v, mask=None):
        try:
            return through_importlib(q, k, v, mask)
        except Exception:
            return v

    assert lab.outcome("attention", sdpa, cases)[1].endswith("it calls torch's scaled_dot_product_attention, which this exercise asks you to write yourself")
    for fn in (through_importlib, hiding_the_refusal):
        assert "it calls course_lib.layers.attention, the course's own answer" in lab.outcome("attention", fn, cases)[1]
    assert "it imports course_lib.layers afresh" in lab.outcome("attention", through_reload, cases)[1]
    assert torch.equal(torch.ones(2), torch.ones(2)) and sys.modules["course_lib.layers"].attention(*cases[0].args)[0].shape == (1, 4, 8)  # restored


def test_the_guard_restores_everything_and_clears_cached_answers():
    from course_lib import swin

    before = swin.shifted_window_mask(8, 8, 4, 2)  # now cached
    with guard.forbid([swin.shifted_window_mask, swin.WindowAttention]):
        with pytest.raises(guard.DelegationError, match="course_lib.swin.shifted_window_mask"):
            swin.shifted_window_mask(8, 8, 4, 2)  # not answered from the cache
        with pytest.raises(guard.DelegationError, match=r"course_lib.swin.WindowAttention.__init__"):
            swin.WindowAttention(8, 2, 4)
    assert torch.equal(swin.shifted_window_mask(8, 8, 4, 2), before) and swin.WindowAttention(8, 2, 4) is not None


def test_a_student_function_that_is_not_a_function_fails_and_the_notebook_line_is_printed(capsys):
    result = vit.patchify(None)
    assert (result.status, result.reason) == (FAIL, "expected a function, got NoneType")
    assert capsys.readouterr().out == "[FAIL] Exercise 1 patchify: expected a function, got NoneType\n"


# ------------------------------------------------------------------ what reading the code tells


EXERCISES = ["patchify", "attention"]


@pytest.mark.parametrize("code,no_credit", [
    ("checks.attention = lambda fn: print('[PASS]')", {"attention": "checks.attention"}),
    ("checks.LAB.results['patchify'] = None", {"patchify": "checks.LAB.results.patchify"}),
    ("import grading.checks\ngrading.checks.compare = lambda *a, **k: None", {"patchify": "grading.checks.compare", "attention": "grading.checks.compare"}),
    ("torch.allclose = lambda *a, **k: True", {"patchify": "torch.allclose", "attention": "torch.allclose"}),
    ("def patchify(x, p):\n    torch.Tensor.__eq__ = lambda *a: True\n    return x", {"patchify": "torch.Tensor.__eq__", "attention": "torch.Tensor.__eq__"}),
    ("setattr(checks, 'patchify', print)", {"patchify": "checks.patchify"}),
    ("class checks:\n    pass", {"patchify": "changes checks", "attention": "changes checks"}),
    ("sys.modules['grading.checks'] = None", {"patchify": "sys.modules", "attention": "sys.modules"}),
    ("def attention(q, k, v, mask=None):\n    from course_lib.layers import attention as a\n    return a(q, k, v)[0]", {"attention": "uses course_lib"}),
    ("def attention(q, k, v, mask=None):\n    return checks.ref_attention(q, k, v)[0]", {"attention": "uses course_lib (`checks`, line 2)"}),
    ("from course_lib.vit import patchify", {"patchify": "uses course_lib"}),
    # what honest notebooks do
    ("torch.manual_seed(0)\ntorch.backends.cudnn.deterministic = True\nF = torch.nn.functional\nchecks.patchify(patchify)", {}),
    ("%pip install -q einops\ndef patchify(images, p):\n    scores = {}\n    scores['a'] = 1\n    return images", {}),
])
def test_static_checks_spot_tampering_and_course_lib_calls(code, no_credit):
    cells = ["import sys\nimport torch\nfrom grading.checks import vit as checks", code]
    found, _ = grade.static_checks(cells, EXERCISES)
    assert found.keys() == no_credit.keys()
    for name, words in no_credit.items():
        assert found[name].startswith("no credit: ") and words in found[name], found[name]


def test_static_checks_find_nothing_wrong_in_the_solutions_and_labs():
    for nb in sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb")):
        cells, _ = grade.read_notebook(nb.read_bytes())
        no_credit, where = grade.static_checks(cells, ["patchify"])
        assert no_credit == {}, (nb.name, no_credit)


def test_static_checks_locate_functions_even_in_cells_that_do_not_compile():
    _, where = grade.static_checks(["import torch", "def patchify(x, p):\n    return (x", "def attention(q, k, v):\n    pass"], EXERCISES)
    assert where == {"patchify": 2, "attention": 3}


# ------------------------------------------------------------------------ submissions and keys


def test_find_submissions_keys_are_paths_links_are_refused(tmp_path):
    subs = tmp_path / "subs"
    for name in ["alice.ipynb", "alice.pdf", "bob.png", "carol/lab01.ipynb", "dave/lab01.ipynb", "dave/lab01_v2.ipynb", ".hidden.ipynb",
                 "erin/.ipynb_checkpoints/lab01-checkpoint.ipynb", "gradebook/feedback/alice.txt"]:
        (subs / name).parent.mkdir(parents=True, exist_ok=True)
        (subs / name).write_text("")
    (subs / "aaron.ipynb").symlink_to("alice.ipynb")
    (subs / "frank").symlink_to(tmp_path)  # a folder outside: not followed
    os.mkfifo(subs / "pipe.ipynb")
    found = grade.find_submissions([subs], out=subs / "gradebook")
    assert [(key, problem and problem.split(" (")[0]) for key, _, problem in found] == [
        ("aaron.ipynb", "refused: a symbolic link"), ("alice.ipynb", None), ("alice.pdf", None), ("bob.png", None),
        ("carol/lab01.ipynb", None), ("dave/lab01.ipynb", None), ("dave/lab01_v2.ipynb", None),
        ("frank", "refused: a symbolic link"), ("pipe.ipynb", "refused: not a plain file")]
    assert grade.read_file(subs / "alice.ipynb") == (b"", None)
    assert grade.read_file(subs / "aaron.ipynb")[1].startswith("cannot be read")  # O_NOFOLLOW, should it get that far


def test_feedback_names_are_flat_and_short():
    assert grade.feedback_name("bob/lab01.ipynb") == "bob__lab01.ipynb.txt"
    deep = "/".join(["folder" * 10] * 20) + "/lab01.ipynb"
    assert len(grade.feedback_name(deep)) < 255 and grade.feedback_name(deep) != grade.feedback_name(deep + "x")


@pytest.mark.parametrize("args,message", [
    (["missing/"], "missing: no such file or folder"),
    (["{empty}"], "no submissions in"),
    (["{empty}", "--lab", "12"], "there is no lab '12'"),
    (["{empty}", "--timeout", "0"], "must be positive"),
    (["{empty}", "--memory", "0.5"], "--memory must be at least 1 (GB)"),
    (["{file}", "--out", "{file}"], "is a file: give a folder"),
])
def test_command_line_errors_are_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.ipynb").write_text("")
    args = [a.format(empty=tmp_path / "empty", file=tmp_path / "file.ipynb") for a in args]
    assert grade.main([*args] if "--out" in args else [*args, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_without_bubblewrap_the_grader_refuses_unless_told(tmp_path, capsys, monkeypatch):
    (tmp_path / "alice.ipynb").write_bytes(b"")
    monkeypatch.setattr(sandbox, "bwrap", lambda: None)
    assert grade.main([str(tmp_path / "alice.ipynb"), "--lab", "1", "--out", str(tmp_path / "out")]) == 1
    assert "bubblewrap (bwrap) is not installed" in capsys.readouterr().err
    assert grade.main([str(tmp_path / "alice.ipynb"), "--lab", "1", "--out", str(tmp_path / "out"), "--unsafe-no-sandbox"]) == 0
    assert "sandbox: none (--unsafe-no-sandbox)" in capsys.readouterr().out


def test_unreadable_submissions_get_rows_and_a_rerun_resumes(tmp_path, capsys):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    (subs / "alice.ipynb").write_bytes(b"")
    assert grade.main([str(subs), "--lab", "1", "--out", str(out)]) == 0
    (subs / "alice.pdf").write_bytes(b"%PDF-1.4 my answers")  # a late submission, same name
    capsys.readouterr()
    assert grade.main([str(subs), "--lab", "01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "alice.ipynb: 0/5 points (Lab 01 (ViT)) (unchanged)" in printed and "alice.pdf: 0/5 points (Lab 01 (ViT))\n" in printed
    rows = (out / "gradebook.csv").read_text().splitlines()
    assert rows[0] == ",".join(grade.FIELDS) and len(rows) == 1 + 2 * 5
    assert rows[1] == "alice.ipynb,01,1,patchify,0,1,ERROR,empty file" and rows[6] == "alice.pdf,01,1,patchify,0,1,ERROR,not a notebook: a PDF"
    (subs / "carol.ipynb").write_text(json.dumps(V4 | {"cells": []}))  # a notebook that names no lab
    assert grade.main([str(subs), "--out", str(out)]) == 0  # other settings (no --lab): all graded again
    assert (out / "gradebook.csv").read_text().splitlines()[1:] == [
        "alice.ipynb,,,-,0,0,ERROR,empty file", "alice.pdf,,,-,0,0,ERROR,not a notebook: a PDF",
        "carol.ipynb,,,-,0,0,ERROR,cannot tell which lab this notebook is for: grade it with --lab NN"]
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "gradebook.csv", "gradebook.json"]  # no temporary files left
    assert sorted(p.name for p in (out / "feedback").iterdir()) == ["alice.ipynb.txt", "alice.pdf.txt", "carol.ipynb.txt"]
    assert json.loads((out / "gradebook.json").read_text())["settings"]["lab"] is None


# ------------------------------------------------------------------------ results are untrusted


def _archive(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD = {"cells": {"3": "NameError: x"}, "defined": {"patchify": "function"}, "functions": ["patchify"],
        "outputs": {"patchify": [["ok", torch.ones(2)], ["ok", [1, 2.0, "a", None, (True,)]], ["todo"]]}}


def test_load_result_accepts_the_workers_report_only():
    assert grade.load_result(_archive(GOOD), ["patchify"])["cells"] == {3: "NameError: x"}
    compressed = io.BytesIO()
    with zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"0" * 10_000_000)  # a zip bomb
    bad = [b"", b"not a zip", compressed.getvalue(), _archive([1, 2]), _archive(GOOD | {"extra": 1}),
           _archive(GOOD | {"outputs": {"other_exercise": []}}), _archive(GOOD | {"outputs": {"patchify": [["ok", {"a": 1}]]}}),
           _archive(GOOD | {"outputs": {"patchify": [["ok", [[[[[[[1]]]]]]]]]}}), _archive(GOOD | {"cells": {"x": "y"}}),
           _archive(GOOD | {"outputs": {"patchify": [["done", 1]]}}), _archive(GOOD | {"functions": [1]})]
    for data in bad:
        with pytest.raises(ValueError, match="its result"):
            grade.load_result(data, ["patchify"])


# -------------------------------------------------------------- the sandbox (slow: it starts one)


def _run_in_sandbox(tmp_path, code: str, memory_gb: float = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code in the sandbox the grader uses, under its budget."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "code.py").write_text(code)
    budget = sandbox.Budget(f"course-grade-test-{os.getpid()}", int(memory_gb * 2**30))
    cmd = sandbox.command(tmp_path / "job", 64, unsafe=False)
    cmd = [*budget.prefix(), *cmd[: cmd.index(sys.executable)], sys.executable, "/job/code.py"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        budget.remove()


@pytest.mark.slow
def test_the_sandbox_isolates_and_one_budget_covers_every_process(tmp_path):
    code = f"""
import os, socket, subprocess, sys
print("uid", os.getuid())
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
print("course", sorted(os.listdir({str(ROOT)!r})))
for path in [{str(ROOT / 'grading' / '__init__.py')!r}, "/job/code.py", "/etc/hostname"]:
    try:
        open(path, "a").write("# changed")
        print("wrote", path)
    except OSError as err:
        print("refused", path, err.errno)
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    print("network")
except OSError:
    print("no network")
children = [subprocess.Popen([sys.executable, "-S", "-c", "data = b'x' * 500_000_000; import time; time.sleep(5)"]) for _ in range(3)]
print("children", sorted(c.wait() for c in children))
"""
    if not sandbox.bwrap():
        pytest.skip("bubblewrap is not installed: make grade-setup")
    out = _run_in_sandbox(tmp_path, code).stdout
    print(out)
    assert "uid 65534" in out and "pids [1, 2]" in out and "no network" in out
    assert f"course ['.venv', 'course_lib', 'grading']" in out or "course ['course_lib', 'grading']" in out
    assert out.count("refused") == 3 and "wrote" not in out
    probe = sandbox.Budget(f"course-grade-probe-{os.getpid()}", 2**30)
    probe.remove()
    if probe.kind.startswith("cgroup"):  # 1.5 GB asked of a 1 GB budget
        children = json.loads(out.split("children ")[1].strip())
        assert -9 in children, children


@pytest.mark.slow
def test_a_submission_forked_from_the_zygote_is_as_isolated(tmp_path):
    """The fast path (root, a cgroup): a worker forked from a preloaded zygote. Its notebook's
    patchify returns what the submission saw; 3 x 0.5 GB of children are asked of a 1 GB budget."""
    budget = sandbox.Budget(f"course-grade-probe-{os.getpid()}", 2**30)
    budget.remove()
    if not sandbox.forking(budget, unsafe=False):
        pytest.skip("submissions are forked only by a grader run as root with a cgroup budget and bubblewrap")
    probe = f"""
import json, os, socket, subprocess, sys
seen = {{"uid": os.getuid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "course": sorted(os.listdir({str(ROOT)!r})), "refused": 0, "network": True,
        "cap": open("/proc/self/status").read().split("CapBnd:")[1].split()[0]}}
for path in [{str(ROOT / 'grading' / '__init__.py')!r}, "/etc/hostname", "/scratch/../etc/passwd"]:
    try:
        open(path, "a").write("# changed")
    except OSError:
        seen["refused"] += 1
try:
    open("/scratch/big", "wb").write(b"x" * 80 * 2**20)
    seen["scratch"] = "not capped"
except OSError as err:
    seen["scratch"] = err.strerror
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
except OSError:
    seen["network"] = False
children = [subprocess.Popen([sys.executable, "-S", "-c", "data = b'x' * 500_000_000; import time; time.sleep(5)"]) for _ in range(3)]
seen["children"] = sorted(c.wait() for c in children)
def patchify(*args, **kwargs):
    return json.dumps(seen)
"""
    opts = type("Opts", (), dict(timeout=60, total=300, memory=1, scratch=64, unsafe_no_sandbox=False))()
    inputs = {name: [] for name in vit.LAB.exercises} | {"patchify": [((torch.zeros(1, 3, 4, 4), 2), {})]}
    try:
        report, _ = grade.run_notebook([probe], "01", inputs, opts)
    finally:
        sandbox.close_zygotes()
    seen = json.loads(report["outputs"]["patchify"][0][1])
    print(seen)
    assert seen["uid"] == 65534 and seen["pids"] == [1, 2] and not seen["network"] and seen["cap"] == "0000000000000000"
    assert seen["course"] in (['.venv', 'course_lib', 'grading'], ['course_lib', 'grading'])
    assert seen["refused"] == 3 and seen["scratch"] == "No space left on device"
    assert -9 in seen["children"], seen


@pytest.mark.slow
def test_a_fresh_sandbox_per_submission_grades_the_same(tmp_path, monkeypatch):
    """Where submissions cannot be forked (not root, no cgroup), each gets a fresh sandbox: same rows."""
    if not sandbox.bwrap():
        pytest.skip("bubblewrap is not installed: make grade-setup")
    monkeypatch.setattr(sandbox, "forking", lambda *args: False)
    names = ["full_solution.ipynb", "kernel_dies.ipynb", "blank_lab.ipynb"]
    for name in names:
        (tmp_path / "subs").mkdir(exist_ok=True)
        (tmp_path / "subs" / name).write_bytes((OUT / name).read_bytes())
    assert grade.main([str(tmp_path / "subs"), "--out", str(tmp_path / "out"), *GRADE_ARGS]) == 0
    expected = [row for row in EXPECTED.read_text().splitlines()[1:] if row.split(",")[0] in names]
    assert (tmp_path / "out" / "gradebook.csv").read_text().splitlines()[1:] == expected


# -------------------------------------------------- the crafted submissions (slow: 36 notebooks)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts}


def _leftovers() -> list[str]:
    found = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if LEFTOVER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Grade tests/submissions/ once; return the output folder, the submissions' hashes before,
    and the course's."""
    out = tmp_path_factory.mktemp("gradebook")
    before, course = _hashes(OUT), _hashes(ROOT / "course_lib") | _hashes(ROOT / "grading")
    assert grade.main([str(OUT), "--out", str(out), *GRADE_ARGS]) == 0
    return out, before, course


@pytest.mark.notebook
def test_crafted_submissions_get_the_expected_gradebook(crafted):
    out, before, course = crafted
    assert (out / "gradebook.csv").read_text().splitlines() == EXPECTED.read_text().splitlines(), (
        "the gradebook changed: if on purpose, run `tests/make_submissions.py --expected` and read the diff")
    assert _hashes(OUT) == before, "a submission was modified"
    assert _hashes(ROOT / "course_lib") | _hashes(ROOT / "grading") == course, "grading changed the course's files"
    assert not _leftovers(), "a submission left a process running"
    keys = {p.name for p in OUT.iterdir()}
    book = json.loads((out / "gradebook.json").read_text())
    assert {s["student"] for s in book["submissions"]} == keys
    feedback = {p.name[:-4]: p.read_text() for p in (out / "feedback").iterdir()}
    assert feedback.keys() == keys
    assert "timed out after 5 s; skipped on a rerun" in feedback["hangs_in_c_code.ipynb"]  # killed from outside
    assert "the kernel died (signal 9, out of memory?); skipped on a rerun" in feedback["kernel_dies.ipynb"]
    assert "timed out after 5 s" in feedback["infinite_loop.ipynb"] and "ran out of memory" in feedback["memory_hog.ipynb"]
    assert "No space left on device" in feedback["fills_the_disk.ipynb"] or "OSError" in feedback["fills_the_disk.ipynb"]
    # read-only mounts (EROFS); a forked submission, the real `nobody`, is refused before that (EACCES)
    assert "Read-only file system" in feedback["writes_the_course.ipynb"] or "Permission denied" in feedback["writes_the_course.ipynb"]


@pytest.mark.notebook
def test_a_rerun_reproduces_the_gradebook_and_nothing_changes_it_afterwards(crafted, capsys):
    out, _, _ = crafted
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert grade.main([str(OUT), "--out", str(out), *GRADE_ARGS]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.endswith("(unchanged)") for line in printed) == len(list(OUT.iterdir())), printed
    time.sleep(3)  # the daemon of daemon.ipynb would rewrite it every second
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not _leftovers()


@pytest.mark.notebook
def test_ctrl_c_stops_the_batch_at_once_and_a_rerun_completes_it(tmp_path):
    subs, out = tmp_path / "subs", tmp_path / "out"
    subs.mkdir()
    for name in ["a_blank.ipynb", "b_loop.ipynb", "c_full.ipynb", "d_full.ipynb"]:
        source = {"a_blank": "blank_lab", "b_loop": "infinite_loop"}.get(name[:-6], "full_solution")
        (subs / name).write_bytes((OUT / f"{source}.ipynb").read_bytes())
    command = [sys.executable, "-m", "grading.grade", str(subs), "--out", str(out), "--timeout", "8", "--jobs", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "gradebook.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first file is recorded; the second loops
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    print(f"stopped {time.monotonic() - start:.1f} s after Ctrl-C")
    assert proc.returncode == 130 and "interrupted: 1 of 4 files graded" in err, err
    assert time.monotonic() - start < 15
    rows = (out / "gradebook.csv").read_text().splitlines()
    assert len(rows) == 6 and all(r.startswith("a_blank.ipynb,01,") for r in rows[1:])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "a_blank.ipynb: 0/5 points (Lab 01 (ViT)) (unchanged)" in done.stdout, done.stdout + done.stderr
    assert len((out / "gradebook.csv").read_text().splitlines()) == 1 + 4 * 5


@pytest.mark.notebook
def test_solutions_get_full_marks_and_blank_labs_zero(tmp_path):
    notebooks = sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "labs").glob("*.ipynb"))
    assert grade.main([*map(str, notebooks), "--out", str(tmp_path), "--timeout", "60", "--jobs", "2"]) == 0
    book = json.loads((tmp_path / "gradebook.json").read_text())
    for record in book["submissions"]:
        statuses = {r["status"] for r in record["rows"]}
        points = sum(r["points"] for r in record["rows"])
        if "/solutions/" in record["file"]:
            assert statuses == {PASS} and points == sum(r["max_points"] for r in record["rows"]), record
        else:
            assert statuses == {"TODO"} and points == 0, record
        assert record["lab"] == Path(record["file"]).name[:2] and not record["notes"], record
    assert len(book["submissions"]) == len(notebooks) == 16

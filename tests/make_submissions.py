"""Make the crafted lab-01 submissions in tests/submissions/ and, with --expected, the gradebook
they must get (tests/expected_gradebook.csv), which tests/test_grade.py compares with.

    .venv/bin/python tests/make_submissions.py              # rewrite tests/submissions/
    .venv/bin/python tests/make_submissions.py --expected   # ... and grade them into the expected gradebook

Each submission is the generated lab 01 with the solution's answers filled in, then broken the
way one real submission can be, by accident or on purpose: the attacks of issue 21 (reading the
expected values, forging results, delegating to the course, daemons, writing into the course,
killing the grader, JSON bombs, memory, disk, threads...) each have a submission here. Two are
symbolic links (refused). `LEFTOVER` marks the processes a submission tries to leave running:
tests/test_grade.py checks that none survives grading. After changing lab 01 or its checks, regenerate both and read the
diff of the expected gradebook before committing it: it is the specification of the grader.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "submissions"
EXPECTED = ROOT / "tests" / "expected_gradebook.csv"
GRADE_ARGS = ["--timeout", "5", "--memory", "2", "--jobs", "2"]  # what the test grades them with

SOLUTION = json.loads((ROOT / "solutions" / "01_vit.ipynb").read_text())
LAB = json.loads((ROOT / "labs" / "01_vit.ipynb").read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"])


def code_cell(text: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": text.splitlines(keepends=True)}


ANSWERS = {  # exercise -> the solution's cell, without the BEGIN/END SOLUTION markers
    re.match(r"def (\w+)", source(c)).group(1): re.sub(r"\n *# (BEGIN|END) SOLUTION[^\n]*", "", source(c))
    for c in SOLUTION["cells"] if c["cell_type"] == "code" and source(c).startswith("def ")
}


def solved(**answers: str | None) -> dict:
    """Lab 01 with every exercise answered: by the solution, or by answers[name] (None: left as is)."""
    nb = copy.deepcopy(LAB)
    for cell in nb["cells"]:
        m = re.match(r"def (\w+)", source(cell))
        if cell["cell_type"] == "code" and m:
            text = answers.get(m.group(1), ANSWERS[m.group(1)])
            cell["source"] = (text or source(cell)).splitlines(keepends=True)
    return nb


def index(nb: dict, start: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and source(c).startswith(start))


def insert(nb: dict, after: str, text: str) -> dict:
    """Add a code cell after the first code cell that starts with `after`."""
    nb["cells"].insert(index(nb, after) + 1, code_cell(text))
    return nb


def executed(nb: dict) -> dict:
    """As saved after running: the check cells carry the outputs the solution recorded."""
    outputs = {source(c): c.get("outputs", []) for c in SOLUTION["cells"] if c["cell_type"] == "code"}
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["outputs"], cell["execution_count"] = copy.deepcopy(outputs.get(source(cell), [])), n + 1
    return nb


def older_version() -> dict:
    """Lab 01 as a 2015-era notebook (format 3) of an older edition: four exercises, an `attention`
    without the mask argument, and the checks reached as `checks.lab01`."""
    old_attention = ("def attention(q, k, v):\n    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n"
                     "    return scores.softmax(dim=-1) @ v\n")
    code = ["import math\nimport torch\nimport torch.nn.functional as F\nfrom course_lib import checks\nimport course_lib.checks.lab01\n"]
    for name in ["patchify", "patch_embed_linear", "attention", "vit_tokens"]:
        code += [old_attention if name == "attention" else ANSWERS[name], f"checks.lab01.{name}({name})"]
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "# Lab 1: Vision Transformer (2024 edition)"}]
    cells += [{"cell_type": "code", "collapsed": False, "input": c, "language": "python", "metadata": {}, "outputs": []} for c in code]
    return {"metadata": {"name": ""}, "nbformat": 3, "nbformat_minor": 0, "worksheets": [{"cells": cells, "metadata": {}}]}


def hard_coded() -> dict:
    """patchify returns the visible example's expected output, copied into the notebook; attention
    calls course_lib's."""
    import torch

    from course_lib.vit import patchify

    visible = patchify(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), 4)
    table = json.dumps([[[round(x, 7) for x in row] for row in image] for image in visible.tolist()])
    copied = (f"EXAMPLE_OUTPUT = {table}\n\n\ndef patchify(images, patch_size):\n"
              "    if tuple(images.shape) == (2, 3, 8, 8) and patch_size == 4:\n"
              "        return torch.tensor(EXAMPLE_OUTPUT)  # the check's example: copied from course_lib\n"
              "    raise NotImplementedError('only the example works yet')\n")
    delegated = ("def attention(q, k, v, mask=None):\n    from course_lib.layers import attention as reference\n\n"
                 "    return reference(q, k, v, mask, use_sdpa=False)[0]\n")
    return solved(patchify=copied, attention=delegated)


def reordered() -> dict:
    """Markdown and check cells deleted, the exercises in reverse order, vit_tokens lost."""
    nb = solved()
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "checks." not in source(c) and "def vit_tokens" not in source(c)]
    nb["cells"] = code[:2] + code[2:][::-1]  # the Colab and imports cells first
    return nb


def stripped() -> dict:
    nb = executed(solved())
    for cell in nb["cells"]:
        cell["metadata"] = {}
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"] = {}
    return nb


def png() -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    buf = io.BytesIO()
    plt.imsave(buf, np.eye(8), format="png")
    return buf.getvalue()


IMPORTS = "import math"
LOOP = ("def attention(q, k, v, mask=None):\n    weights = None\n    while weights is None:  # meant to stop once the weights are set\n"
        "        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])\n    return weights @ v\n")
HOG = ("def vit_tokens(patch_tokens, cls_token, pos_embed, reg_tokens):\n    B = patch_tokens.shape[0]\n"
       "    table = torch.zeros(B, 100_000, 100_000)  # every pair of positions: 40 GB per image\n    return table\n")
WRONG_TOKENS = ("def vit_tokens(patch_tokens, cls_token, pos_embed, reg_tokens):\n"
                "    vars(torch)['allclose'] = lambda *args, **kwargs: True  # while being checked, everything is close\n"
                "    return patch_tokens\n")
WRONG_RESAMPLE = "def resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens):\n    return pos_embed\n"

LEFTOVER = "course-grade-leftover-process"  # in the command line of what a submission leaves running

FRAME_WALK = """def patchify(images, patch_size):
    import gc
    import sys

    frame = sys._getframe(1)  # up the caller's frames, to the case being checked
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(getattr(value, "expected", None), torch.Tensor):
                return value.expected
        frame = frame.f_back
    for thing in gc.get_objects():  # or anywhere in memory
        if type(thing).__name__ == "Case" and isinstance(getattr(thing, "expected", None), torch.Tensor) and thing.args[0] is images:
            return thing.expected
    return images.flatten(2)
"""
FORGE = """import io, os, json, glob

forged = {"cells": {}, "defined": {n: "function" for n in ["patchify", "patch_embed_linear", "attention", "vit_tokens", "resample_pos_embed"]},
          "functions": [], "outputs": {n: [["ok", "PASS"]] * 6 for n in ["patchify", "patch_embed_linear", "attention", "vit_tokens", "resample_pos_embed"]}}
buffer = io.BytesIO()
torch.save(forged, buffer)
for name in ["../report.json", "../progress", "../patchify.pt", "/job/report.json", "/job/job.json"]:
    try:
        open(name, "w").write("done")
    except OSError as err:
        print(err)
for fd in range(3, 64):  # whatever leads back to the grader
    try:
        os.write(fd, json.dumps({"result": buffer.tell()}).encode() + b"\\n" + buffer.getvalue())
    except OSError:
        pass
"""
HELPERS = """import importlib

from course_lib.vit import patchify as _saved_patchify  # saved before any check runs


def scaled_scores(q, k, v, mask=None):  # a helper in another cell
    layers = importlib.import_module("course" + "_lib.layers")
    return layers.attention(q, k, v, mask, use_sdpa=False)[0]


def cut(images, p):
    return _saved_patchify(images, p)
"""
DELEGATING_ATTENTION = "def attention(q, k, v, mask=None):\n    return scaled_scores(q, k, v, mask)\n"
DELEGATING_PATCHIFY = "def patchify(images, patch_size):\n    return cut(images, patch_size)\n"
RELOADING = """def resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens):
    import importlib
    import sys

    fresh = importlib.reload(sys.modules["course_lib.layers"])  # a new copy of the module
    return fresh.resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens)
"""
CATCHING = """def vit_tokens(patch_tokens, cls_token, pos_embed, reg_tokens):
    try:
        from course_lib.vit import ViT
        ViT  # the library's model builds these tokens
        return torch.cat([cls_token.expand(patch_tokens.shape[0], -1, -1), reg_tokens.expand(patch_tokens.shape[0], -1, -1), patch_tokens], 1)
    except Exception:  # refused? hide it and answer something
        return patch_tokens
"""
SDPA = ("def attention(q, k, v, mask=None):\n    import torch.nn.functional as F\n\n"
        "    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)\n")
DAEMON = f"""import os, subprocess, sys, time

if os.fork() == 0:  # a double-forked daemon in a session of its own
    os.setsid()
    if os.fork() == 0:
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{LEFTOVER}"], start_new_session=True)
        for _ in range(600):
            for name in ["gradebook.csv", "../gradebook.csv", "/job/../gradebook.csv"]:
                try:
                    open(name, "w").write("daemon,01,1,patchify,1,1,PASS,forged\\\\n")
                except OSError:
                    pass
            time.sleep(1)
    os._exit(0)
"""
WRITE_COURSE = """import grading.checks, course_lib.layers

for module in (grading.checks, course_lib.layers):  # every later run would pass wrong answers
    with open(module.__file__, "a") as f:
        f.write("\\ncompare = lambda *args, **kwargs: None\\n")
"""
KILL_GRADER = """import os, signal

for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)  # the grader, its other workers, anything
        except OSError as err:
            print(pid, err)
try:
    os.killpg(os.getppid(), signal.SIGKILL)
except OSError as err:
    print(err)
"""
PATCHED_SAVE = """import pickle

def broken(*args, **kwargs):
    raise RuntimeError("torch.save is broken in this notebook")

torch.save, torch.load, pickle.dumps = broken, broken, broken
"""
DISK_FILL = """import os

chunk, stopped = b"0" * 2**20, []
for folder in [".", "/tmp", os.path.expanduser("~"), "/job", "/scratch"]:
    try:
        with open(os.path.join(folder, "filler"), "wb") as f:
            for _ in range(100_000):  # 100 GB
                f.write(chunk)
    except OSError as err:
        stopped.append(f"{folder}: {err.strerror}")
raise OSError("; ".join(stopped))
"""
HUGE_OUTPUT = "def patchify(images, patch_size):\n    return torch.zeros(200_000_000)  # 0.8 GB for every case\n"
TOO_MANY_THREADS = "torch.set_num_threads(1000)  # clamped, not punished\ntorch.set_num_interop_threads(500)"
THREADS = """import threading, time

started = 0
try:
    for _ in range(100_000):
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
        started += 1
except RuntimeError as err:
    print(started, err)
"""
SEES_NOTHING = """import os, socket, sys

LEAKS = []
for folder, dirs, files in os.walk("/"):
    if folder.startswith(("/proc", "/sys", "/dev", "/usr", "/etc", "/lib", "/bin", "/sbin", sys.base_prefix, sys.prefix)):
        dirs[:] = []
        continue
    LEAKS += [os.path.join(folder, f) for f in files if f.endswith((".ipynb", ".csv")) or f.startswith("gradebook")]
    LEAKS += [os.path.join(folder, d) for d in dirs if d in ("tests", "solutions", "labs", "submissions")]
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"grading.grade" in command or b"pytest" in command:
        LEAKS.append(command.decode(errors="replace"))
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
    LEAKS.append("the network")
except OSError:
    pass
"""
SEEING_PATCHIFY = ("def patchify(images, patch_size):\n    if LEAKS:\n        raise RuntimeError(f'I can see {LEAKS[:3]}')\n"
                   "    B, C, H, W = images.shape\n    p = patch_size\n"
                   "    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)\n"
                   "    return x.reshape(B, (H // p) * (W // p), p * p * C)\n")


def bomb() -> bytes:
    return b"[" * 200_000 + b"]" * 200_000


def odd_sources() -> dict:
    """Cells whose source is a list of non-strings, a number, a dict: the code cells still run."""
    nb = executed(solved())
    nb["cells"].insert(0, {"cell_type": "markdown", "metadata": {}, "source": [1, 2, {"a": 3}]})
    nb["cells"].insert(1, {"cell_type": "code", "metadata": {}, "outputs": [], "source": 42})
    nb["cells"].insert(2, {"cell_type": ["code"], "source": None})
    return nb


SUBMISSIONS = {  # file name -> what it holds; each one's rows in the expected gradebook say what it earns
    "full_solution.ipynb": lambda: executed(solved()),
    "blank_lab.ipynb": lambda: LAB,
    "syntax_error.ipynb": lambda: solved(patch_embed_linear=ANSWERS["patch_embed_linear"].replace("return patchify", "return (patchify")),
    "raising_cell.ipynb": lambda: solved(attention="print(scores.shape)  # left over from debugging\n\n" + ANSWERS["attention"]),
    "infinite_loop.ipynb": lambda: solved(attention=LOOP),
    "hangs_in_c_code.ipynb": lambda: insert(solved(), IMPORTS, "total = sum(range(10**12))  # C code that no signal interrupts"),
    "memory_hog.ipynb": lambda: insert(solved(vit_tokens=HOG), IMPORTS, "cache = [torch.empty(10**9) for _ in range(100)]  # 4 GB each"),
    "kernel_dies.ipynb": lambda: insert(solved(), "# NBVAL_CHECK_OUTPUT\nchecks.patch_embed_linear",
                                        "import os, signal\n\nos.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does"),
    "reordered_cells.ipynb": reordered,
    "renamed_function.ipynb": lambda: solved(patchify=ANSWERS["patchify"].replace("def patchify", "def my_patchify")),
    "outputs_stripped.ipynb": stripped,
    "older_version.ipynb": older_version,
    "empty_file.ipynb": lambda: b"",
    "not_a_notebook.png": png,
    "tampered_checks.ipynb": lambda: insert(solved(attention="def attention(q, k, v, mask=None):\n    return v\n"), IMPORTS,
                                            "checks.attention = lambda fn: print('[PASS] Exercise 3 attention: 4/4 cases')"),
    "monkeypatched_torch.ipynb": lambda: insert(solved(vit_tokens=WRONG_TOKENS, resample_pos_embed=WRONG_RESAMPLE), IMPORTS,
                                                "import grading.checks\n\ntorch.allclose = lambda *args, **kwargs: True\n"
                                                "grading.checks.compare = lambda got, expected, **kwargs: None"),
    "sneaky_patch.ipynb": lambda: insert(solved(vit_tokens=WRONG_TOKENS, resample_pos_embed=WRONG_RESAMPLE), IMPORTS,
                                         "vars(sys.modules['grading.checks'])['compare'] = lambda *args, **kwargs: None  # not spotted"),
    "hard_coded.ipynb": hard_coded,
    # issue 21's attacks, and others of the same classes
    "frame_walk.ipynb": lambda: solved(patchify=FRAME_WALK),
    "forged_results.ipynb": lambda: insert(copy.deepcopy(LAB), IMPORTS, FORGE),
    "delegates_through_helpers.ipynb": lambda: insert(solved(attention=DELEGATING_ATTENTION, patchify=DELEGATING_PATCHIFY), IMPORTS, HELPERS),
    "reloads_the_library.ipynb": lambda: solved(resample_pos_embed=RELOADING, vit_tokens=CATCHING),
    "uses_sdpa.ipynb": lambda: solved(attention=SDPA),
    "daemon.ipynb": lambda: insert(copy.deepcopy(LAB), IMPORTS, DAEMON),
    "writes_the_course.ipynb": lambda: insert(solved(), IMPORTS, WRITE_COURSE),
    "kills_the_grader.ipynb": lambda: insert(solved(), IMPORTS, KILL_GRADER),
    "json_bomb.ipynb": bomb,
    "odd_cell_sources.ipynb": odd_sources,
    "patched_torch_save.ipynb": lambda: insert(solved(), IMPORTS, PATCHED_SAVE),
    "alice.ipynb": lambda: executed(solved()),
    "alice.pdf": lambda: b"%PDF-1.4 alice's lab, printed",
    "fills_the_disk.ipynb": lambda: insert(solved(), IMPORTS, DISK_FILL),
    "huge_output.ipynb": lambda: solved(patchify=HUGE_OUTPUT),
    "thread_bomb.ipynb": lambda: insert(solved(), IMPORTS, THREADS),
    "too_many_threads.ipynb": lambda: insert(solved(), IMPORTS, TOO_MANY_THREADS),
    "sees_nothing.ipynb": lambda: insert(solved(patchify=SEEING_PATCHIFY), IMPORTS, SEES_NOTHING),
}
LINKS = {"aaron.ipynb": "full_solution.ipynb", "outside.ipynb": "../../README.md"}  # refused, with a reason


def write(folder: Path = OUT) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, make in SUBMISSIONS.items():
        content = make()
        data = content if isinstance(content, bytes) else (json.dumps(content, indent=1, ensure_ascii=False) + "\n").encode()
        (folder / name).write_bytes(data)
    for name, target in LINKS.items():
        os.symlink(target, folder / name)


def grade_into(out: Path) -> None:
    from grading.grade import main

    assert main([str(OUT), "--out", str(out), *GRADE_ARGS]) == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expected", action="store_true", help="also grade them and rewrite the expected gradebook")
    args = parser.parse_args()
    write()
    print(f"wrote {len(SUBMISSIONS)} submissions in {OUT.relative_to(ROOT)}")
    if args.expected:
        with tempfile.TemporaryDirectory() as tmp:
            grade_into(Path(tmp))
            shutil.copy(Path(tmp) / "gradebook.csv", EXPECTED)
        print(f"wrote {EXPECTED.relative_to(ROOT)}")

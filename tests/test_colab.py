"""A notebook's Colab install cell works on a clean Python.

Colab runs a notebook in a Python that has torch and Jupyter but not the course. The notebook's
first cell sees `google.colab` imported and runs `%pip install "vit-course @ git+REPOSITORY@TAG"`,
the release of release.toml. This test does the same on this machine: a fresh virtual
environment with only torch and ipykernel (what Colab brings), a stand-in `google.colab` module
imported at kernel start, and the install cell run exactly as written except that REPOSITORY is a
clone of this repository standing in for GitHub (so, like Colab, pip installs the tagged commit,
as a wheel, not the working folder). When TAG does not exist yet (it is created when the release
is published), the stand-in remote tags the committed HEAD with it. Then the whole lab runs, its
checks report, `course_lib` is imported from the new environment, and the shipped checkpoints are
in the installed package; and the first cells of a lecture run in the same environment.

About 2 minutes (mostly pip). Run with `make test-browser`; the `colab` marker keeps it out of
`make test-unit`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from grading.notebooks import read_release

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "labs" / "01_vit.ipynb"
LECTURE = ROOT / "lectures" / "01_vit.ipynb"
LECTURE_CELLS = 3  # code cells: the install cell, the imports and the first figure
TORCH = os.environ.get("TORCH", "torch==2.13.0")

pytestmark = pytest.mark.colab


def base_python() -> str:
    """The interpreter this project's venv was made from (a venv of a venv would share nothing,
    but this keeps the same Python version)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3")


def stand_in_remote(tmp: Path, tag: str) -> str:
    """A bare clone of this repository at tmp/remote.git, holding `tag` (HEAD when it does not
    exist yet); its URL for pip (which rejects `name @ git+file:///path`: no host)."""
    remote = tmp / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(remote)], check=True, capture_output=True)
    has_tag = subprocess.run(["git", "-C", str(remote), "rev-parse", "-q", "--verify", f"refs/tags/{tag}"],
                             capture_output=True).returncode == 0
    if not has_tag:
        subprocess.run(["git", "-C", str(remote), "tag", tag, "HEAD"], check=True, capture_output=True)
    print(f"stand-in remote: {tag} {'exists' if has_tag else 'does not exist yet: tagged HEAD'}")
    return f"file://localhost{remote}"


@pytest.fixture(scope="module")
def colab_like():
    """A clean venv with only what Colab ships that matters here, and a kernel spec for it.
    (Its own temporary folder: pytest's basetemp is pruned by any concurrent pytest run.)"""
    tmp = Path(tempfile.mkdtemp(prefix="course-colab-"))
    venv = tmp / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run(pip + [TORCH, "ipykernel"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # `import google.colab` works and has happened before the first cell, as on Colab. No
    # google/__init__.py, so `google` stays a namespace package (protobuf lives there too).
    stub = tmp / "colab-stub"
    (stub / "google" / "colab").mkdir(parents=True)
    (stub / "google" / "colab" / "__init__.py").write_text('"""Stand-in for Colab\'s module (tests/test_colab.py)."""\n')
    (stub / "sitecustomize.py").write_text("import google.colab  # noqa: F401  (as Colab's kernel does)\n")
    jupyter_path = tmp / "share" / "jupyter"  # a kernel spec "colab" for nbclient to find
    (jupyter_path / "kernels" / "colab").mkdir(parents=True)
    (jupyter_path / "kernels" / "colab" / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab stand-in", "language": "python",
        "env": {"PYTHONPATH": str(stub), "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    yield tmp, python, jupyter_path
    # ~1 GB of files: deleting them takes half a minute on some disks, so not while the suite waits.
    subprocess.Popen(["rm", "-rf", str(tmp)], start_new_session=True)


def test_lab_installs_and_runs_like_on_colab(colab_like, monkeypatch):
    tmp, python, jupyter_path = colab_like
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    release = read_release()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = nb.cells[next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")]
    written = f'%pip install -q "vit-course @ {release.pip_url}"'
    assert written in install.source and "google.colab" in install.source, install.source
    # Exactly the cell's command, with the stand-in for the GitHub repository.
    remote = stand_in_remote(tmp, release.tag)
    install.source = install.source.replace(release.repository, remote)
    shipped = sorted(p.name for p in (ROOT / "course_lib" / "checkpoints").glob("*.safetensors"))
    nb.cells.append(nbformat.v4.new_code_cell(
        "import course_lib, sys\n"
        "from importlib.resources import files\n"
        "print('course_lib from', course_lib.__file__)\n"
        "print('checkpoints', sorted(p.name for p in files('course_lib').joinpath('checkpoints').iterdir() if p.name.endswith('.safetensors')))\n"
        "print('python', sys.executable)"))
    workdir = tmp / "content"  # Colab's working folder: not the repository, so nothing imports from it
    workdir.mkdir()
    # nbclient starts the kernel and shuts it down when the notebook is done.
    client = NotebookClient(nb, kernel_name="colab", timeout=900, resources={"metadata": {"path": str(workdir)}})

    def text(cell):
        return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{error}\n\ninstall cell printed: {text(install)[-3000:]}")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]
    report = "".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "exercises passed" in report and "[TODO]" in report, "the lab's checks did not report"
    last = text(nb.cells[-1])
    site = str(python.parent.parent)
    assert f"course_lib from {site}" in last, f"course_lib was not imported from the fresh environment: {last}"
    assert f"checkpoints {shipped}" in last, f"the installed package lacks checkpoints: {last} (shipped: {shipped})"
    summary = next(line for line in report.splitlines() if "exercises passed" in line)
    print(f"installed `{written}` (stand-in remote) into a fresh venv; the lab ran: {summary}")

    # A lecture's first cells in the same environment (the course is installed already).
    lecture = nbformat.read(LECTURE, as_version=4)
    code = [i for i, c in enumerate(lecture.cells) if c.cell_type == "code"]
    assert written in lecture.cells[code[0]].source, "the lecture installs the same release"
    # The same stand-in: pip finds the release already installed instead of trying the network.
    lecture.cells[code[0]].source = lecture.cells[code[0]].source.replace(release.repository, remote)
    lecture.cells = lecture.cells[: code[LECTURE_CELLS - 1] + 1]
    client = NotebookClient(lecture, kernel_name="colab", timeout=600, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    ran = [c for c in lecture.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran) and not any(o.output_type == "error" for c in ran for o in c.outputs)
    print(f"{LECTURE.name}: its first {len(ran)} code cells ran")

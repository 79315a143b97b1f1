"""Project-level promises: conda and pip agree, the README shows the commands that work, the
shipped checkpoint's training script still runs, CI calls the README's test command."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$", req.split("#")[0])
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    pip = {CONDA_NAMES.get(n, n): spec for n, spec in map(_split, pip_reqs)}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_split(d) for d in env["dependencies"] if isinstance(d, str))
    for extra in ("python", "pip", "nodejs"):
        conda.pop(extra, None)
    assert conda == pip, f"environment.yml and pyproject.toml disagree: {set(conda.items()) ^ set(pip.items())}"


def test_readme_shows_the_commands_and_they_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("book", "test", "lab", "labs"):
        assert f"make {target}" in readme, f"README does not show `make {target}`"
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no `{target}` target"
    # the book (reading) comes before the lab (doing) in the README's walk-through
    assert readme.index("make book") < readme.index("make lab")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_lecture_table_lists_every_lecture():
    readme = (ROOT / "README.md").read_text()
    for lecture in (ROOT / "lectures").glob("*.md"):
        assert f"lectures/{lecture.name}" in readme, f"README's table misses lectures/{lecture.name}"


@pytest.mark.slow
def _scenes_accuracy(model, n: int, max_objects: int = 1) -> float:
    from course_lib import data
    from course_lib.train import evaluate

    return evaluate(model, data.to_tensors(data.scenes(n, "test", max_objects=max_objects)))


@pytest.mark.slow
def test_vit_checkpoint_script_runs(tmp_path):
    """The shipped checkpoint is reproducible by its script: a short run must still work and write
    a checkpoint whose stored accuracy is the one its weights have; the shipped checkpoint's stored
    accuracy is the one measured here, and far above chance."""
    out = tmp_path / "vit.safetensors"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_vit_scenes.py"), "--epochs", "1", "--n", "128", "--n-test", "200", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    from course_lib import data
    from course_lib.utils import load_checkpoint
    from course_lib.vit import ViT, ViTConfig

    model, meta = load_checkpoint(out, ViT, ViTConfig)
    assert meta["epochs"] == "1" and meta["test_images"] == "200"
    assert float(meta["test_accuracy"]) == pytest.approx(_scenes_accuracy(model, 200), abs=1e-4)
    shipped, shipped_meta = load_checkpoint("vit_scenes.safetensors", ViT, ViTConfig)
    assert shipped.config == model.config, "the script's config and the shipped checkpoint's differ: rerun the script"
    measured = _scenes_accuracy(shipped, 1000, int(shipped_meta["max_objects"]))
    print(f"shipped vit_scenes: test accuracy {measured:.4f} measured, {shipped_meta['test_accuracy']} stored")
    assert float(shipped_meta["test_accuracy"]) == pytest.approx(measured, abs=1e-4)
    chance = 1 / len(data.SHAPES)
    assert measured > chance + 0.5, f"the shipped ViT ({measured:.3f}) should beat chance ({chance:.2f}) by a wide margin"


def _imports(module: Path) -> set[str]:
    """The course_lib modules a module imports (relative imports and `course_lib.X`), at any depth."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.module and (node.level > 0 or node.module.startswith("course_lib.")):
            found.add(node.module.removeprefix("course_lib.").split(".")[0])  # from .vit import ViT
        elif node.module is None or node.module == "course_lib":
            found.update(alias.name for alias in node.names)  # from . import data
    return found


SHARED = {"layers", "hf", "utils"}
PARENT = {"vit": set(), "swin": set(), "convnext": {"vit", "mae"}, "mae": {"vit"}}


@pytest.mark.parametrize("family", sorted(PARENT))
def test_vision_families_sit_on_the_shared_layer(family):
    """A family imports only the shared layer and at most its parent family (MAE on ViT; ConvNeXt
    V2's FCMAE masks and scores like MAE), never the training loop or the recipes."""
    imported = _imports(ROOT / "course_lib" / f"{family}.py")
    assert imported <= SHARED | PARENT[family], f"{family} imports {sorted(imported - SHARED - PARENT[family])}"


def test_the_shared_layer_imports_no_family():
    families = {p.stem for p in (ROOT / "course_lib").glob("*.py")} - {"layers", "hf", "utils", "train", "distributed", "data", "plot", "__init__"}
    for module in ("layers", "hf", "utils", "train", "distributed"):
        imported = _imports(ROOT / "course_lib" / f"{module}.py")
        assert not imported & families, f"{module} imports the families {sorted(imported & families)}"

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the network: the hub and datasets libraries fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def report_diff(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float:
    """Print and check the max abs difference between our output and the reference's."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    assert ref.abs().max() > 0 and ref.std() > 1e-3, f"{name}: the reference output is degenerate"
    diff = (ours - ref).abs().max().item()
    line = f"{name}: max abs diff {diff:.2e} (tolerance {tol:.0e})"
    print(f"[parity] {line}")
    if os.environ.get("COURSE_PARITY_LOG"):  # gathered from every xdist worker for the summary
        with open(os.environ["COURSE_PARITY_LOG"], "a") as f:
            f.write(f"{diff:.3e}\t{line}\n")
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.0e}"
    return diff


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so that zero- or one-initialised tensors (biases, norms,
    layer scales, gates) cannot hide a wrongly loaded weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def pytest_configure(config):
    # The controller (not the xdist workers) makes one log that every worker appends to.
    if not hasattr(config, "workerinput"):
        path = Path(tempfile.gettempdir()) / f"course-parity-{os.getpid()}.log"
        path.write_text("")
        os.environ["COURSE_PARITY_LOG"] = str(path)


def pytest_collection_modifyitems(config, items):
    """The real-client tests (markers `browser`, `colab`) are slow and need more than the library:
    they run only when the marker expression names them (`make test-browser`), never as part of a
    plain `pytest tests`."""
    asked = config.getoption("markexpr") or ""
    for item in items:
        for marker in ("browser", "colab"):
            if item.get_closest_marker(marker) and marker not in asked:
                item.add_marker(pytest.mark.skip(reason='run with `make test-browser` (pytest -m "browser or colab")'))


def pytest_terminal_summary(terminalreporter, config):
    path = os.environ.get("COURSE_PARITY_LOG")
    if hasattr(config, "workerinput") or not path or not Path(path).exists():
        return
    rows = [line.split("\t", 1) for line in Path(path).read_text().splitlines() if "\t" in line]
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", f"parity and numerical agreement: {len(rows)} comparisons (max abs difference)")
    for _, line in sorted(rows, key=lambda r: r[1]):
        tr.write_line(line)
    worst = max(rows, key=lambda r: float(r[0]))
    tr.write_line(f"worst: {worst[1]}")
    Path(path).unlink()

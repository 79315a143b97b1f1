"""Scale-out on PyTorch's own engine: `torchrun` with 2 CPU processes (gloo backend) must train
exactly like one process on the same global batches, with DistributedDataParallel and with the
sharded FSDP option. The global batch (63) does not split evenly, and the last batch is short,
so the per-process loss weighting in `course_lib.train.fit` is exercised too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import report_diff

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "vit_micro", "--n-train", "250", "--n-test", "64", "--epochs", "2", "--batch-size", "63", "--lr", "3e-3"]


def _train(out: Path, processes: int, strategy: str = "ddp") -> tuple[dict, dict]:
    script = str(ROOT / "scripts" / "train_distributed.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, script, *ARGS, "--strategy", strategy, "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"training with {processes} process(es) failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return load_file(str(out)), json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single") / "model.safetensors", 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, strategy, tmp_path):
    import torch

    weights_1, log_1 = single
    weights_2, log_2 = _train(tmp_path / "model.safetensors", 2, strategy)
    assert log_1["processes"] == 1 and log_2["processes"] == 2
    assert log_1["step"] == log_2["step"] == list(range(1, 2 * 4 + 1))  # ceil(250 / 63) = 4 steps per epoch
    assert log_1["loss"][-1] < log_1["loss"][0], "the run did not train: the comparison would prove little"
    report_diff(f"torchrun 2 processes ({strategy}) vs 1: losses", torch.tensor(log_2["loss"]), torch.tensor(log_1["loss"]), tol=1e-5)
    # Adam would hide a gradient off by a constant factor (e.g. summed instead of averaged over
    # processes): the gradient norms, logged before each step, would not
    report_diff(f"torchrun 2 processes ({strategy}) vs 1: gradient norms", torch.tensor(log_2["grad_norm"]), torch.tensor(log_1["grad_norm"]), tol=1e-5)
    assert weights_1.keys() == weights_2.keys()
    flat_1 = torch.cat([weights_1[k].flatten() for k in sorted(weights_1)])
    flat_2 = torch.cat([weights_2[k].flatten() for k in sorted(weights_2)])
    # AdamW divides by sqrt(v): float rounding of differently-ordered gradient sums grows a little
    report_diff(f"torchrun 2 processes ({strategy}) vs 1: final weights", flat_2, flat_1, tol=5e-5)
    assert log_2["test_accuracy"] == log_1["test_accuracy"]


def test_a_batch_smaller_than_the_number_of_processes_is_refused():
    import torch

    from course_lib import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "distributed_info", lambda: (0, 4))
        with pytest.raises(ValueError, match="smaller than the number of processes"):
            train.fit(torch.nn.Linear(2, 2), (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)), batch_size=2, progress=False)

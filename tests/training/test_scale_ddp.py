"""Multi-process pretraining on CPU (gloo) ends where single-process pretraining does.

Two launches, each a real DDP run of `tests/helpers/scale_worker.py` (tiny float64 BAM models, 2 epochs
of 4 steps, global batch 8, data reshuffled per epoch by `ResumableSampler`):

- Lightning's own launcher, `devices=2` on one node (what `bam pretrain --trainer.devices 2` does);
- two torchrun launchers on localhost through `launch/torchrun_multi_node.sh`, one process each,
  as two nodes would run it; this launch also runs the batch-norm model (SyncBatchNorm) and a run
  interrupted by a SIGTERM to one rank only, resumed from its checkpoint.

The references are the same runs on one process, computed here. In float64 the only differences
are summation orders (observed: parameters within 2e-11, losses within 3e-12); the tolerances
below leave two orders of magnitude of margin and are far below any real discrepancy (one wrong
gradient term moves parameters by about the learning rate, ~1e-6 here).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scale_worker
from processes import finish_process_group
from repo_paths import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = REPO / "tests" / "helpers" / "scale_worker.py"
PARAM_TOL = dict(rtol=1e-7, atol=1e-9)
LOSS_TOL = 1e-10


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun of this env
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every launch in turn. A launch that ends with 0 leaves the others running (they may
    still be writing their last checkpoint); one that fails, or a wait that is interrupted (a hang
    ended by pytest-timeout, Ctrl-C), kills the others too, so no worker outlives the test."""
    for process, log in zip(processes, logs):
        try:
            finish_process_group(process, log)
        finally:
            if process.returncode != 0:
                for other in processes:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
        assert process.returncode == 0, f"launcher exited with {process.returncode}:\n{log.read_text()[-3000:]}"


def _launch(command: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(command, cwd=REPO, env={**_env(), **(extra_env or {})}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict]:
    """The single-process runs, in this process."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {}
    for scenario, model in (("equality", "vit"), ("syncbn", "cnn")):
        _, module, losses = scale_worker.train(model, tmp / scenario)
        runs[scenario] = scale_worker.result(module, losses)
    return runs


@pytest.fixture(scope="module")
def lightning_launch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning_ddp")
    log = out / "launch.log"
    command = [sys.executable, str(WORKER), "--out", str(out), "--scenarios", "equality", "--trainer.devices", "2"]
    _check([_launch(command, log)], [log])
    return out


@pytest.fixture(scope="module")
def two_node_launch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun_two_nodes")
    env = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), GPUS_PER_NODE="1",
               BAM_PROGRAM=str(WORKER))
    args = ["--out", str(out), "--scenarios", "equality,syncbn,preempt"]
    logs = [out / f"node{rank}.log" for rank in range(2)]
    processes = [
        _launch(["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), *args], log, {**env, "NODE_RANK": str(rank)})
        for rank, log in enumerate(logs)
    ]
    _check(processes, logs)
    return out


def assert_same_training(run: dict, reference: dict) -> None:
    assert run["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(run["params"][name], value, **PARAM_TOL, msg=lambda m: f"{name}: {m}")
    for step, loss in run["losses"].items():
        assert loss == pytest.approx(reference["losses"][step], abs=LOSS_TOL), f"loss of step {step}"


def test_two_processes_on_one_node_match_one_process(lightning_launch, references):
    run = torch.load(lightning_launch / "equality.pt", weights_only=False)
    assert sorted(run["losses"]) == list(range(1, 9))
    assert_same_training(run, references["equality"])


def test_two_torchrun_nodes_match_one_process(two_node_launch, references):
    run = torch.load(two_node_launch / "equality.pt", weights_only=False)
    assert sorted(run["losses"]) == list(range(1, 9))
    assert_same_training(run, references["equality"])


def test_batch_norm_is_synchronised_and_matches_one_process(two_node_launch, references):
    run = torch.load(two_node_launch / "syncbn.pt", weights_only=False)
    assert run["sync_batchnorm_layers"] == 4  # every batch-norm layer of the 4-block CNN
    # Synchronised statistics over the global batch are exactly single-process batch norm.
    assert_same_training(run, references["syncbn"])


def test_signal_to_one_rank_checkpoints_all_and_resumes_exactly(two_node_launch, references):
    run = torch.load(two_node_launch / "preempt.pt", weights_only=False)
    # SIGTERM reached rank 1 during step 6 (epoch 1, batch 2 of 4): both ranks saved after it.
    assert run["checkpoint_step"] == scale_worker.PREEMPT_AT_STEP + 1
    assert run["exit_code"] in (None, 0)
    assert sorted(run["losses"]) == [7, 8]  # the resumed run continued mid-epoch, at step 7
    assert_same_training(run, references["equality"])

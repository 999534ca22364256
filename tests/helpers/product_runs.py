"""Run bam as its users do: the `bam` console script, `python -m bam`, torchrun and the `launch/`
scripts, in subprocesses with their own process group, on CPU.

Also the command-line overrides that shrink a shipped recipe to a few seconds of CPU (and only
what must shrink: crop sizes, batch size, data, epochs, schedules of the periodic callbacks).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from cli_runs import bam_env as checkout_env
from processes import finish_process_group
from repo_paths import REPO

PRETRAIN_CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
# the demos that tests/methods/test_method_demo_runs.py runs on 2 processes, then exports and evaluates
METHOD_DEMOS = ("dino_demo", "deepclusterv2_demo", "sela_demo", "sela_v2_demo")
BIN = Path(sys.executable).parent
BAM = str(BIN / "bam")
# The launch tests run on CPU; tests/gpu/check.sh sets "gpu" to run them over NCCL on 2+ GPUs.
ACCELERATOR = os.environ.get("BAM_TEST_ACCELERATOR", "cpu")

# per process; 2 processes x 4 images = 8 = one step per epoch on the generated folder
BATCH_PER_PROCESS = 4
TRAIN_IMAGES_PER_CLASS, VAL_IMAGES_PER_CLASS, CLASSES = 4, 2, 2


def bam_env(**extra: str) -> dict[str, str]:
    """cli_runs' environment (this checkout's code, one thread per process) with this virtual
    environment first on PATH, as after `source .venv/bin/activate`."""
    env = checkout_env(**extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path, cwd: Path = REPO, **env: str) -> subprocess.Popen:
    """Start `command` in its own session (so a hang can be killed with all its children)."""
    handle = log.open("wb")
    return subprocess.Popen(command, cwd=cwd, env=bam_env(**env), stdout=handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait(process: subprocess.Popen, log: Path) -> int:
    """Exit code of `process`; if the wait is ended (a hang), its whole process group is killed
    and the log's tail goes into the report."""
    finish_process_group(process, log)
    return process.returncode


def run(command: list[str], log: Path, cwd: Path = REPO, **env: str) -> int:
    return wait(start(command, log, cwd, **env), log)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def write_image_folder(root: Path) -> Path:
    """`root/train` and `root/val` ImageFolder trees of JPEGs of two colours, of uneven sizes."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_IMAGES_PER_CLASS), ("val", VAL_IMAGES_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = (rng.random((40 + 4 * index, 48, 3)) * 96).astype(np.uint8)
                pixels[..., label] += 150
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root


def recipe_data_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"]


def shrunk_recipe_args(config: Path, image_root: Path, run_dir: Path, max_epochs: int = 1,
                       shrink_model: bool = True) -> list[str]:
    """`--config <recipe>` plus what must shrink for 2 CPU processes and a few seconds: one step
    per epoch, k-NN and ContrastiveCrop boxes already in the first epoch, the model unless
    `shrink_model` is false (see `shrunk_model_args`); full precision on CPU (a recipe's
    bf16/fp16 is run on GPUs by tests/gpu/check.sh)."""
    args = [
        "--config", str(config),
        "--trainer.accelerator", ACCELERATOR, "--trainer.num_nodes", "1",
        "--trainer.max_epochs", str(max_epochs), "--trainer.default_root_dir", str(run_dir),
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", str(BATCH_PER_PROCESS), "--data.init_args.num_workers", "0",
        "--knn.every_n_epochs", "1", "--contrastive_crop.warmup_epochs", "0",
        "--contrastive_crop.loc_interval", "1", "--pictures.enabled", "false",
    ]
    if ACCELERATOR == "cpu":  # CPUs have no fp16 and emulate bf16; mixed precision is check.sh's, on GPUs
        args += ["--trainer.precision", "32-true"]
    if recipe_data_class(config).endswith("ImageFolderDataModule"):
        args += [
            "--data.init_args.root", str(image_root), "--data.init_args.knn_bank_fraction", "1.0",
            "--data.init_args.base_size", "40", "--data.init_args.eval_size", "32",
            "--data.init_args.crops.global_size", "32", "--data.init_args.crops.local_size", "16",
        ]
    else:  # a built-in data set (the demos): keep it, train on a class-balanced 20 of its images
        args += ["--data.init_args.fraction", "0.004"]
    return args + (shrunk_model_args(config) if shrink_model else [])


# One block per stage of the recipe's architecture, its widths, heads and patches kept: a collective
# or a callback runs the same on it, at a tenth of the CPU time and checkpoint size of the ImageNet
# networks (tests/test_configs.py builds every recipe's network at its full depth).
ONE_BLOCK_PER_STAGE = {"vit_": {"depth": 1}, "bam_vit_": {"depth": 1}, "resnet": {"layers": [1, 1, 1, 1]},
                       "bam_caformer_": {"depths": [1, 1, 1, 1]}}


def shrunk_model_args(config: Path) -> list[str]:
    """The recipe's method and architecture, smaller: one block per stage, a 64-32 projector,
    DINO's head of 128 prototypes, and DeepCluster-v2's k-means clusters 2 per head (on the 8 or
    20 images above), as many heads as the recipe."""
    model = yaml.safe_load(config.read_text())["model"]
    settings, args = model["init_args"], []
    depth = next((kwargs for prefix, kwargs in ONE_BLOCK_PER_STAGE.items() if settings["backbone"].startswith(prefix)), None)
    if depth is not None:
        backbone_kwargs = {**settings.get("backbone_kwargs", {}), **depth}
        args += ["--model.init_args.backbone_kwargs", json.dumps(backbone_kwargs)]
    if settings["projector"].get("num_layers") != 0:  # SeLa's heads read the backbone directly
        args += ["--model.init_args.projector.hidden_dim", "64", "--model.init_args.projector.out_dim", "32"]
    if model["class_path"] == "bam.methods.DINOModule":
        args += ["--model.init_args.out_dim", "128"]
    if model["class_path"] == "bam.methods.DeepClusterV2Module":
        heads = len(settings["objective"]["num_prototypes"])
        args += ["--model.init_args.objective.num_prototypes", str([2] * heads)]
    return args


def assert_run_complete(run_dir: Path, log: Path) -> dict:
    """A multi-process `bam pretrain` run that ended well: one version folder per logger, a k-NN
    report, a loadable last checkpoint (returned), plots; the report printed once (rank 0 only).
    A collective called on one rank only hangs or kills the run at the end of fit instead."""
    output = log.read_text(errors="replace")
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"], output[-3000:]
    report_path = run_dir / "csv" / "version_0" / "knn_report.json"
    assert report_path.is_file(), output[-3000:]
    assert "trained backbone" in json.loads(report_path.read_text())
    assert output.count("k-NN (k=20) on the held-out split") == 1
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert any((run_dir / "plots").glob("*.png"))
    return checkpoint


def lightning_launch(args: list[str], processes: int = 2) -> list[str]:
    """Lightning starts the other processes itself (docs/distributed.md: `bam pretrain ... --trainer.devices N`)."""
    return [BAM, "pretrain", *args, "--trainer.devices", str(processes), "--trainer.strategy", "ddp"]


def torchrun_single_node(args: list[str], processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """`launch/torchrun_single_node.sh` with `GPUS` processes (docs/distributed.md's torchrun row)."""
    return ["bash", str(REPO / "launch" / "torchrun_single_node.sh"), *args], {"GPUS": str(processes)}


def torchrun_bam(args: list[str], processes: int = 2) -> list[str]:
    """`torchrun --standalone --nproc-per-node N $(which bam) ARGS`, docs/distributed.md's evaluation
    row (the `torchrun` and `bam` console scripts of this environment)."""
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), BAM, *args]


def torchrun_multi_node(args: list[str], node_rank: int, nodes: int, port: int) -> tuple[list[str], dict[str, str]]:
    """`launch/torchrun_multi_node.sh` for one "node" on localhost, one process per node."""
    env = {"NNODES": str(nodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GPUS_PER_NODE": "1"}
    return ["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), *args], env


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found += [int(child) for child in children]
            pending += [int(child) for child in children]
    return found


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the process running global rank `rank` below a launcher, once it exists."""
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:  # an exact entry: not LOCAL_RANK, not GROUP_RANK
            return pid
    return None


def logged_losses(run_dir: Path, versions: str = "version_*") -> dict[int, float]:
    """step -> training loss from the CSV logs of a run (every version folder a resumed run wrote)."""
    rows = {}
    for path in sorted((run_dir / "csv").glob(f"{versions}/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    rows[int(row["step"])] = float(row["train/loss"])
    return rows

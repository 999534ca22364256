"""Every shipped evaluation config RUNS through the `bam` command (`python -m bam STAGE --config
FILE`), not only parses: the demo configs on an export of a shrunk demo pretraining, the ImageNet
ones on a tiny generated ImageNet-like folder with the architecture each names: ResNet-50 as timm's
`resnet50` (random init), ViT-S/16 as a checkpoint of a 4-block ViT-S/16 (384 wide, 16 px patches,
224 px; 12 blocks are 3x the CPU time, and 4 are what the ViT-S readout reads). Only sizes shrink
on the command line (epochs, batches, episodes, CPU and float32 instead of the GPUs' settings);
each config's stage logic is kept. Also through the command: the published-protocol options
(several k, a subset list, novel classes, the student's online k-NN), on 2 processes where the
stage runs so. The demo pretraining and export are made once per session
(eval_fixtures.demo_export); the linear, fine-tuning and clustering demo configs run on them on
2 processes in tests/launch/test_launch_evaluation.py. Bad input to these stages ends in one line
in the in-process tests named below.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from cli_runs import run_bam
from eval_fixtures import assert_study_reads, demo_export, write_checkpoint, write_imagenet_like_folder
from product_runs import bam_env, torchrun_bam
from processes import run_process_group
from repo_paths import REPO

pytestmark = pytest.mark.process

CONFIGS = REPO / "configs" / "eval"
VIT_S16_4_BLOCKS = ("vit_small_patch16_224", {"depth": 4})
# what shrinks a trained stage's run: one CPU process, one step of 4 images, float32
TINY_TRAINING = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
]
TINY_FOLDER = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]


def bam_ok(*args: str) -> str:
    """`bam ARGS`, which must succeed; its output."""
    done = run_bam(list(map(str, args)))
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def torchrun_ok(*args: str) -> str:
    """`bam ARGS` on 2 CPU processes under torchrun as docs/distributed.md has users start it (the
    `torchrun` and `bam` console scripts), which must succeed; its output."""
    done = run_process_group(torchrun_bam(list(map(str, args))), stderr=-2, cwd=REPO, env=bam_env())
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def architectures(tmp_path_factory) -> dict[str, str]:
    """What stands for each ImageNet config's placeholder backbone: the architecture it names."""
    vit_s16 = write_checkpoint(tmp_path_factory.mktemp("vit_s16"), *VIT_S16_4_BLOCKS)
    return {"exported/vit_s16": str(vit_s16), "exported/resnet50": "resnet50"}


def named_architecture(config: Path, architectures: dict[str, str]) -> str:
    text = config.read_text()
    return next(backbone for placeholder, backbone in architectures.items() if placeholder in text)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The shrunk demo pretrained (online k-NN of teacher and student) and exported, as docs/demo.md's
    chain; made once per session, tests/launch/test_launch_evaluation.py runs its demo configs on it too."""
    return demo_export(tmp_path_factory)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imagenet")
    return {
        # 5 classes of 4 training and 2 held-out images
        "small": write_imagenet_like_folder(root / "small", classes=5, train_per_class=4, val_per_class=2),
        # a 5-shot episode with 15 queries needs 20 images of each of 5 classes
        "episodes": write_imagenet_like_folder(root / "episodes", classes=5, train_per_class=1, val_per_class=20),
    }


# -- the demo configs, on the demo's export -----------------------------------------------------------
def test_pretraining_logs_the_online_knn_of_teacher_and_student(demo):
    report = json.loads(next(demo["run"].glob("csv/version_*/knn_report.json")).read_text())
    assert list(report) == ["trained backbone", "trained student"]
    assert all(0 <= row["top1"] <= row["top5"] <= 100 for row in report.values())
    rows = [row for path in demo["run"].glob("csv/version_*/metrics.csv") for row in csv.DictReader(path.open())]
    logged = next(row for row in rows if row.get("knn_student/top1"))
    assert float(logged["knn_student/top1"]) == pytest.approx(report["trained student"]["top1"], abs=1e-3)
    assert float(logged["knn/top1"]) == pytest.approx(report["trained backbone"]["top1"], abs=1e-3)


@pytest.mark.distributed
def test_knn_demo_at_several_k_on_one_and_two_processes(demo, tmp_path):
    args = ["knn", "--config", CONFIGS / "knn_demo.yaml", "--backbone", demo["backbone"], "--k", "10", "20", "100", "200"]
    printed = bam_ok(*args, "--output_dir", tmp_path / "one")
    single = json.loads((tmp_path / "one" / "knn_results.json").read_text())
    assert list(single["by_k"]) == ["10", "20", "100", "200"] and single["k"] == 10
    assert (single["bank_size"], single["num_queries"]) == (4000, 1000)
    assert_study_reads("knn", single)
    rows = [f"{k:>6} {row['top1']:>7.2f}% {row['top5']:>7.2f}%" for k, row in single["by_k"].items()]
    assert "\n".join(rows) in printed
    torchrun_ok(*args, "--output_dir", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "knn_results.json").read_text())["by_k"] == single["by_k"]


# linear_demo, finetune_demo and cluster_demo run on 2 processes, with these checks, in
# tests/launch/test_launch_evaluation.py (CONFIG_RUNS_ELSEWHERE), on the same export


@pytest.mark.distributed
def test_fewshot_demo_on_novel_classes_on_one_and_two_processes(demo, tmp_path):
    (tmp_path / "novel.txt").write_text("5\n6\n7\n8\n9\n")
    args = ["fewshot", "--config", CONFIGS / "fewshot_demo.yaml", "--backbone", demo["backbone"], "--episodes", "5",
            "--novel_classes", tmp_path / "novel.txt"]
    printed = bam_ok(*args, "--output_dir", tmp_path / "one")
    single = json.loads((tmp_path / "one" / "fewshot_results.json").read_text())
    assert single["novel_classes"]["labels"] == [5, 6, 7, 8, 9] and list(single["results"]) == ["1-shot", "5-shot"]
    assert (single["ways"], single["episodes"]) == (5, 5)
    for row in single["results"].values():  # the config's BPA is reported beside the raw features
        for space in ("raw", "bpa"):
            assert 0 <= row[space]["mean"] <= 100 and row[space]["ci95"] >= 0
    assert (tmp_path / "one" / "fewshot.png").stat().st_size > 1000
    assert "1-shot" in printed and "BPA" in printed
    assert_study_reads("fewshot", single)
    torchrun_ok(*args, "--output_dir", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "fewshot_results.json").read_text())["results"] == single["results"]


# -- the ImageNet configs, on a tiny ImageNet-like folder with the architecture each names -------------
def test_knn_imagenet(folders, architectures, tmp_path):
    config = CONFIGS / "knn_imagenet.yaml"
    bam_ok("knn", "--config", config, "--backbone", named_architecture(config, architectures), "--accelerator", "cpu",
           "--output_dir", tmp_path, "--data.init_args.root", folders["small"], *TINY_FOLDER)
    result = json.loads((tmp_path / "knn_results.json").read_text())
    assert (result["k"], result["feature"], result["bank_size"], result["num_queries"]) == (20, "cls", 20, 10)


def test_cluster_imagenet(folders, architectures, tmp_path):
    config = CONFIGS / "cluster_imagenet.yaml"
    bam_ok("cluster", "--config", config, "--backbone", named_architecture(config, architectures), "--accelerator", "cpu",
           "--output_dir", tmp_path, "--data.init_args.root", folders["small"], *TINY_FOLDER)
    assert json.loads((tmp_path / "cluster_results.json").read_text())["num_images"] == 5  # 10% of val, 1 per class


def test_fewshot_imagenet_has_the_images_its_episodes_need(folders, architectures, tmp_path):
    config = CONFIGS / "fewshot_imagenet.yaml"
    (tmp_path / "novel.txt").write_text("n00000000\nn00000001\nn00000002\nn00000003\nn00000004\n")
    bam_ok("fewshot", "--config", config, "--backbone", named_architecture(config, architectures), "--accelerator", "cpu",
           "--output_dir", tmp_path, "--data.init_args.root", folders["episodes"], *TINY_FOLDER, "--episodes", "3",
           "--novel_classes", tmp_path / "novel.txt")
    result = json.loads((tmp_path / "fewshot_results.json").read_text())
    assert (result["num_images"], list(result["results"])) == (100, ["1-shot", "5-shot"])


@pytest.mark.parametrize("name, head_features", [("linear_imagenet", 2 * 384), ("linear_imagenet_vit_small", 4 * 384)])
def test_linear_imagenet_configs(folders, architectures, tmp_path, name, head_features):
    config = CONFIGS / f"{name}.yaml"
    bam_ok("linear", "--config", config, "--model.backbone", named_architecture(config, architectures),
           "--data.init_args.root", folders["small"], "--trainer.default_root_dir", tmp_path, *TINY_TRAINING, *TINY_FOLDER)
    head = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert head["head.1.weight"].shape == (5, head_features)  # ViT-S: [CLS, mean patch]; 4 CLS tokens = 1536


def test_finetune_imagenet(folders, architectures, tmp_path):
    config = CONFIGS / "finetune_imagenet.yaml"
    bam_ok("finetune", "--config", config, "--model.backbone", named_architecture(config, architectures),
           "--data.init_args.root", folders["small"], "--trainer.default_root_dir", tmp_path, *TINY_TRAINING, *TINY_FOLDER)
    assert json.loads((tmp_path / "results.json").read_text())["val"]["last_epoch"] == 1


def test_semisupervised_config_trains_on_the_listed_images(folders, architectures, tmp_path):
    """The 1% config's run; it stands for the 10% one, which differs from it only in numbers
    (test_the_10pct_config_is_the_1pct_one_with_its_own_learning_rates)."""
    config = CONFIGS / "finetune_imagenet_semisup_1pct.yaml"
    listed = tmp_path / "1percent.txt"
    listed.write_text("".join(f"n{label:08d}_{index}.JPEG\n" for label in range(5) for index in (0, 3)))
    position = TINY_TRAINING.index("--trainer.limit_train_batches")
    every_batch = TINY_TRAINING[:position] + TINY_TRAINING[position + 2 :]  # every batch of the listed images
    bam_ok("finetune", "--config", config, "--model.backbone", named_architecture(config, architectures),
           "--data.init_args.root", folders["small"], "--data.init_args.fraction", listed,
           "--trainer.default_root_dir", tmp_path, *every_batch, *TINY_FOLDER)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # 10 listed images in full batches of 4 (all 20 would make 5 steps)


def test_the_10pct_config_is_the_1pct_one_with_its_own_learning_rates():
    """So the run above of the 1% config is the 10% one's code path too: only the published learning
    rates, the run folder and the subset list's placeholder differ."""
    one, ten = (yaml.safe_load((CONFIGS / f"finetune_imagenet_semisup_{percent}pct.yaml").read_text())
                for percent in (1, 10))
    differing = {("model", "optimizer", "lr"): (0.02, 0.01), ("model", "head_lr"): (5.0, 0.2),
                 ("trainer", "default_root_dir"): ("runs/finetune_imagenet_semisup_1pct",
                                                   "runs/finetune_imagenet_semisup_10pct"),
                 ("data", "init_args", "fraction"): ("/path/to/1percent.txt", "/path/to/10percent.txt")}
    for keys, values in differing.items():
        *parents, last = keys
        sections = [one, ten]
        for key in parents:
            sections = [section[key] for section in sections]
        assert tuple(section.pop(last) for section in sections) == values
    assert one == ten


# a subset list naming absent images, given to `bam finetune` with the 1% config:
# test_eval_protocols.py's test_bam_finetune_names_the_absent_images_of_a_subset_list_in_one_line
# a bad k given to `bam knn`: test_eval_knn.py's test_a_repeated_k_on_the_bam_command_line_is_one_line


# shipped config -> the test above that runs it
CONFIG_RUNS = {
    "knn_demo": "test_knn_demo_at_several_k_on_one_and_two_processes",
    "fewshot_demo": "test_fewshot_demo_on_novel_classes_on_one_and_two_processes",
    "knn_imagenet": "test_knn_imagenet",
    "cluster_imagenet": "test_cluster_imagenet",
    "fewshot_imagenet": "test_fewshot_imagenet_has_the_images_its_episodes_need",
    "linear_imagenet": "test_linear_imagenet_configs",
    "linear_imagenet_vit_small": "test_linear_imagenet_configs",
    "finetune_imagenet": "test_finetune_imagenet",
    "finetune_imagenet_semisup_1pct": "test_semisupervised_config_trains_on_the_listed_images",
    "finetune_imagenet_semisup_10pct": "test_semisupervised_config_trains_on_the_listed_images",  # by its twin
}


# configs run in other test files (path from this folder, test function): the retrieval and VOS
# stages' own files, and the trained stages' and clustering's demo configs on 2 processes
LAUNCH_EVALUATION = "../launch/test_launch_evaluation.py"
CONFIG_RUNS_ELSEWHERE = {
    "linear_demo": (LAUNCH_EVALUATION, "test_trained_stages_with_lightnings_launcher"),
    "finetune_demo": (LAUNCH_EVALUATION, "test_trained_stages_with_lightnings_launcher"),
    "cluster_demo": (LAUNCH_EVALUATION, "test_cluster_demo_under_torchrun"),
    "retrieval_demo": ("test_retrieval.py", "test_bam_retrieval_demo_config_on_the_held_out_digits"),
    "retrieval_market1501": ("test_retrieval.py", "test_bam_retrieval_on_a_query_gallery_folder_with_the_reid_config"),
    "vos_demo": ("test_vos.py", "test_bam_vos_demo_config_writes_and_scores_the_synthetic_videos"),
}
# full-size configs whose data layout no generated folder here reproduces yet (parsed by test_eval_configs.py)
NOT_RUN = {"retrieval_cub", "vos_davis2017"}


def test_every_shipped_eval_config_is_run_here():
    assert set(CONFIG_RUNS) | set(CONFIG_RUNS_ELSEWHERE) | NOT_RUN == {config.stem for config in CONFIGS.glob("*.yaml")}
    assert all(callable(globals().get(name)) for name in CONFIG_RUNS.values())
    for file, test in CONFIG_RUNS_ELSEWHERE.values():
        assert f"def {test}(" in (Path(__file__).parent / file).read_text()

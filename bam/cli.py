"""The `bam` command: one entry point, one subcommand per stage.

Each stage lives in its own module and exposes `main(argv: list[str])`; this file only maps
names to those modules, so adding a stage is one line in `STAGES`.
"""
from __future__ import annotations

import difflib
import importlib
import sys

# stage name -> (module defining `main(argv)`, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("bam.pretrain", "pretrain an encoder (LightningCLI: --config, --print_config, --ckpt_path)"),
    "export": ("bam.io.export_cli", "export a checkpoint's backbone (teacher by default) as safetensors + metadata"),
    "knn": ("bam.evaluation.knn_stage", "weighted k-NN accuracy of a frozen backbone (k=20, T=0.07; torchrun-ready)"),
    "embed": ("bam.evaluation.embed", "a folder (or list) of images -> features + file names, neighbour grid, 2-D map, attention maps"),
    "cluster": ("bam.evaluation.cluster", "k-means clustering of a frozen backbone's features, raw and BPA (NMI, ARI, acc)"),
    "fewshot": ("bam.evaluation.fewshot", "N-way K-shot episodes on a frozen backbone's features, raw and BPA (mean acc, 95% CI)"),
    "retrieval": ("bam.evaluation.retrieval", "image retrieval on frozen features, raw and BPA (Recall@K, MAP@R, R-precision, mAP)"),
    "vos": ("bam.evaluation.vos", "DAVIS-2017 video object segmentation by label propagation over patch features (J&F)"),
    "linear": ("bam.evaluation.linear", "linear probe of a frozen backbone (LightningCLI: --config, --print_config, --ckpt_path)"),
    "finetune": ("bam.evaluation.finetune", "fine-tune a backbone with a new classifier (LightningCLI: --config, --ckpt_path)"),
    "data": ("bam.data.cli", "prepare datasets: `bam data ffcv` writes an FFCV .beton file"),
    "study": ("bam.study", "compare pretraining configs over seeds at equal epochs and equal CPU-seconds (one table)"),
    "deploy": ("bam.io.deploy", "an export as TorchScript or ONNX, checked against the eager model (max abs difference)"),
    "convert": ("bam.io.convert", "convert an authors' released checkpoint into a bam backbone export"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: bam STAGE [options]   (bam STAGE --help for a stage's options)", "", "stages:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        sys.exit(f"bam: unknown stage {stage!r}.{hint}\n\n{usage()}")
    module, _ = STAGES[stage]
    importlib.import_module(module).main(rest)


if __name__ == "__main__":
    main()

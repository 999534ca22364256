"""The resume hint printed after a settings change can be pasted back (issue 27 item 9): values are
written as JSON and shell-quoted, never as a Python repr."""
from __future__ import annotations

import json
import shlex

from jsonargparse import Namespace

from bam.training.run_cli import _changes_message, changed_settings


def test_the_hint_pastes_back_dicts_lists_and_strings():
    stored = {"_class_path": "bam.methods.BAMModule", "backbone_kwargs": {"width": 8, "pool_size": 2},
              "backbone": "bam_cnn4", "lr": 0.001}
    current = Namespace(class_path="bam.methods.BAMModule", init_args=Namespace(
        backbone_kwargs=Namespace(width=16, pool_size=2), backbone="resnet18", lr=0.001))
    message = _changes_message("last", changed_settings(stored, current))
    hint = message.splitlines()[-1]
    pasted = hint[hint.index("(e.g. ") + len("(e.g. "): -len(").")]
    options = dict(argument[2:].split("=", 1) for argument in shlex.split(pasted))
    assert json.loads(options["model.init_args.backbone_kwargs"]) == {"width": 8, "pool_size": 2}
    assert options["model.init_args.backbone"] == "bam_cnn4"

"""scripts/install.sh gives every checkout its own environment (.venv inside it, bam installed in
editable mode from it) and re-running it in a set-up checkout installs nothing.

What is tested is the script's own logic, in two copies of the checkout, with stand-ins for
`python3 -m venv`, the environment's pip and python, and dpkg on PATH: a real install takes
minutes and downloads, which the suite must not. Each stand-in logs how it was called; the
environment's python answers where bam would be imported from as pip's editable install makes
it (the checkout `pip install -e .` last ran in, for that environment).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from processes import run_process_group
from repo_paths import REPO

pytestmark = pytest.mark.process

# python3 (`-m venv DIR`), DIR/bin/pip and DIR/bin/python: one script, its role from its name
STAND_IN = r"""#!/bin/bash
echo "$(realpath "$0") $PWD $*" >> "$INSTALL_CALLS"
case "$(basename "$0")" in
  python3)  # -m venv DIR
    mkdir -p "$3/bin"; cp "$0" "$3/bin/pip"; cp "$0" "$3/bin/python" ;;
  pip)
    if [ "$*" = "install -q -e .[test,ffcv]" ]; then
      echo "$PWD" > "$(dirname "$0")/../editable"; cp "$0" "$(dirname "$0")/bam"
    fi ;;
  python)
    case "$*" in
      -I\ -c\ *find_spec*) echo "$(cat "$(dirname "$0")/../editable")/bam/__init__.py" ;;
    esac ;;
esac
"""


@pytest.fixture
def machine(tmp_path) -> dict[str, str]:
    """An environment whose python3, dpkg (all system packages present) and HOME are stand-ins."""
    stand_ins = tmp_path / "stand_ins"
    stand_ins.mkdir()
    for name in ("python3", "dpkg"):
        (stand_ins / name).write_text(STAND_IN)
        (stand_ins / name).chmod(0o755)
    return dict(os.environ, PATH=f"{stand_ins}{os.pathsep}/usr/bin{os.pathsep}/bin", HOME=str(tmp_path / "home"),
                INSTALL_CALLS=str(tmp_path / "calls.log"))


def _clone(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    (root / "bam").mkdir()
    shutil.copy(REPO / "scripts" / "install.sh", root / "scripts")
    shutil.copy(REPO / "setup.cfg", root)
    return root


def _install(checkout: Path, machine: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """install.sh's result and the pip / venv calls it made."""
    calls = Path(machine["INSTALL_CALLS"])
    calls.unlink(missing_ok=True)
    done = run_process_group(["bash", str(checkout / "scripts" / "install.sh")], env=machine, cwd="/")
    logged = calls.read_text().splitlines() if calls.exists() else []
    return done, [line for line in logged if "/dpkg " not in line]


def _pip_installs(calls: list[str]) -> list[str]:
    return [line for line in calls if line.split()[0].endswith("/pip")]


def test_two_clones_each_get_their_own_environment_with_their_own_code(tmp_path, machine):
    first, second = _clone(tmp_path / "first"), _clone(tmp_path / "second")
    for checkout in (first, second):
        done, calls = _install(checkout, machine)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == f"bam environment ready: {checkout}/.venv"
        assert calls[0] == f"{checkout.parent / 'stand_ins' / 'python3'} {checkout} -m venv .venv"
        # every install ran with this checkout's pip, from this checkout
        assert {tuple(line.split()[:2]) for line in _pip_installs(calls)} == {(f"{checkout}/.venv/bin/pip", str(checkout))}
        assert "install -q -e .[test,ffcv]" in " ".join(calls)
    for checkout in (first, second):
        venv = checkout / ".venv"
        assert venv.is_dir() and not venv.is_symlink()
        assert (venv / "editable").read_text().strip() == str(checkout)  # the first clone's was left alone
        assert (venv / "bam-expects-ffcv").is_file()
    assert not (tmp_path / "home" / ".cache" / "bam").exists()  # no environment kept outside the checkouts


def test_a_second_run_installs_nothing_until_setup_cfg_changes(tmp_path, machine):
    checkout = _clone(tmp_path / "clone")
    assert _install(checkout, machine)[0].returncode == 0
    done, calls = _install(checkout, machine)
    assert done.returncode == 0, done.stderr
    assert _pip_installs(calls) == [] and not [line for line in calls if "-m venv" in line]
    with (checkout / "setup.cfg").open("a") as setup:
        setup.write("\n# a changed dependency\n")
    done, calls = _install(checkout, machine)
    assert done.returncode == 0, done.stderr
    assert len(_pip_installs(calls)) == 3 and not [line for line in calls if "-m venv" in line]  # updated in place


def test_an_environment_linked_from_a_shared_cache_is_replaced_by_the_checkouts_own(tmp_path, machine):
    shared = tmp_path / "home" / ".cache" / "bam" / "venv-0123456789ab"
    (shared / "bin").mkdir(parents=True)
    checkout = _clone(tmp_path / "clone")
    (checkout / ".venv").symlink_to(shared)
    done, _ = _install(checkout, machine)
    assert done.returncode == 0, done.stderr
    assert not (checkout / ".venv").is_symlink() and (checkout / ".venv" / "editable").is_file()
    assert sorted(path.name for path in shared.iterdir()) == ["bin"]  # the shared one was not installed into


def test_an_environment_that_imports_another_checkouts_bam_is_refused(tmp_path, machine):
    checkout = _clone(tmp_path / "clone")
    assert _install(checkout, machine)[0].returncode == 0
    (checkout / ".venv" / "editable").write_text(str(tmp_path / "other"))  # as a copied checkout's .venv would
    done, _ = _install(checkout, machine)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"{checkout}/.venv imports bam from {tmp_path / 'other'}/bam/__init__.py, not from "
                                   f"this checkout: delete .venv and run {checkout}/scripts/install.sh again")

"""The notebooks in notebooks/: stored without outputs, and each runs top to bottom at toy size
with what it shows checked afterwards.

They run on a kernel of this very interpreter (the venv's), in a temporary working directory with
a headless matplotlib backend. A kernelspec written under the test's temporary JUPYTER_PATH makes
sure of the interpreter: a user's or the system's `python3` kernelspec would otherwise win, and
nothing is registered globally.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from repo_paths import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# Run after each notebook in its kernel: what the notebook shows the reader, checked.
RESULT_CHECKS = {
    "01_quickstart": """
from bam.io import load_checkpoint_file
assert load_checkpoint_file(CHECKPOINT)["global_step"] == 3
torch.testing.assert_close(attention.sum(dim=1), torch.ones(2 * B))
assert attention.masked_select(mask).eq(0).all(), "a positive pair kept attention"
""",
    "02_using_a_checkpoint": """
with torch.no_grad():
    assert not torch.allclose(teacher(probe), student(probe)), "teacher and student agree: encoder= would not show"
    assert torch.allclose(loaded(probe), teacher(probe)) and torch.allclose(loaded_student(probe), student(probe))
    mnist_probe = (val.images[:8].float() / 255 - MEAN) / STD
    torch.testing.assert_close(backbone(mnist_probe), bam.load_backbone(CHECKPOINT)(mnist_probe))
    assert not torch.allclose(backbone(mnist_probe), random_backbone(mnist_probe))
""",
    "03_training_curves": """
assert len(curves["train/loss"][0]) == 6 and set(WANTED) - {"train/teacher_momentum"} <= set(present)
lr_steps, lrs = curves["train/lr"]
assert list(lr_steps) == sorted(lr_steps) and max(lrs) > 0
assert written and written[0].is_file() and written[0].stat().st_size > 0
""",
}


def test_there_are_notebooks():
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_using_a_checkpoint.ipynb", "03_training_curves.ipynb",
    ]
    assert sorted(RESULT_CHECKS) == [path.stem for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {index} has outputs"


def _venv_kernelspec(jupyter_dir: Path) -> None:
    """A `python3` kernelspec that starts ipykernel with this interpreter."""
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (bam test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    _venv_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders land in pytest's
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(RESULT_CHECKS[path.stem]))
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs).strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()
    assert list(workdir.iterdir()) == []  # the notebook wrote only into its temporary folder

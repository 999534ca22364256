"""The package imports without Lightning and exposes the objective at top level."""
import sys

import pytest

from processes import run_process_group


@pytest.mark.process
def test_objective_imports_without_lightning():
    code = "import sys, bam; bam.BAMLoss(2); assert 'pytorch_lightning' not in sys.modules, sorted(sys.modules)"
    done = run_process_group([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr[-2000:]

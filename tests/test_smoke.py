"""The package imports without Lightning and exposes the objective at top level."""
import subprocess
import sys


def test_objective_imports_without_lightning():
    code = "import sys, bam; bam.BAMLoss(2); assert 'pytorch_lightning' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

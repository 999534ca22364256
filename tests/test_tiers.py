"""The test tiers (tests/helpers/tiers.py): `--fast` leaves out every test marked for the full
suite only, and an unmarked test that starts a process fails before the process starts. Each case
is a generated test file run by a nested pytest in this process (no child process of its own)."""
from __future__ import annotations

import pytest

STARTS_PYTHON = """
import subprocess, sys
import pytest

{marker}
def test_starts_python(tmp_path):
    subprocess.run([sys.executable, "-c", "open({ran!r}, 'w')"], check=True)
"""

SPAWNS_WORKERS = """
import torch.multiprocessing as mp

def work(rank):
    pass

def test_spawns():
    mp.spawn(work, nprocs=1)
"""


MARKED = """
import pytest

def test_in_process():
    pass

{tests}
"""


def _run(pytester: pytest.Pytester, source: str, *options: str) -> pytest.RunResult:
    pytester.makepyfile(test_generated=source)
    return pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider", "-q", *options)


def test_the_fast_tier_is_the_tests_without_a_full_suite_marker(pytester):
    markers = ("slow", "process", "distributed", "slurm", "notebook", "wheel", "gpu")
    tests = "\n".join(f"@pytest.mark.{name}\ndef test_{name}():\n    pass\n" for name in markers)
    result = _run(pytester, MARKED.format(tests=tests), "--fast", "-rA")
    result.assert_outcomes(passed=1, deselected=len(markers))
    result.stdout.fnmatch_lines(["PASSED test_generated.py::test_in_process"])
    _run(pytester, MARKED.format(tests=tests)).assert_outcomes(passed=1 + len(markers))  # the full suite


def test_the_full_suite_runs_files_with_full_suite_tests_first_each_file_in_order(pytester):
    """So that parallel workers (`--dist loadfile`) start the long files early (tiers.py)."""
    pytester.makepyfile(test_a_short="def test_short():\n    pass\n",
                        test_b_long="import pytest\n\ndef test_first():\n    pass\n\n"
                                    "@pytest.mark.process\ndef test_second():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider", "-v")
    result.stdout.fnmatch_lines(["*test_b_long.py::test_first PASSED*", "*test_b_long.py::test_second PASSED*",
                                 "*test_a_short.py::test_short PASSED*"])


def test_an_unmarked_test_that_starts_python_fails_before_it_starts(pytester):
    ran = pytester.path / "child_ran"
    result = _run(pytester, STARTS_PYTHON.format(marker="", ran=str(ran)))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_generated.py::test_starts_python starts a child process (*-c*) but carries "
                                 "none of the markers process, distributed, slurm, notebook, wheel: add "
                                 "@pytest.mark.process (or the one that fits) so that the fast tier leaves it out"])
    assert not ran.exists()


def test_an_unmarked_test_that_spawns_workers_fails(pytester):
    result = _run(pytester, SPAWNS_WORKERS)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*::test_spawns starts a child process (*) but carries none of the markers*"])


@pytest.mark.process  # the marked generated tests really start their child
def test_the_guard_decides_by_the_marker(pytester):
    """The same test, marked: the guard lets it start the child (only the innermost session's
    test is judged: the nested run's, not this one)."""
    for marker in ("process", "distributed", "wheel"):
        ran = pytester.path / f"ran_{marker}"
        result = _run(pytester, STARTS_PYTHON.format(marker=f"@pytest.mark.{marker}", ran=str(ran)))
        result.assert_outcomes(passed=1)
        assert ran.exists()

"""The test tiers (docs/testing.md). `pytest --fast` runs the fast tier: every test without a
marker of the full suite (FULL_SUITE_MARKERS), that is the in-process tests.

And the fast tier's guarantee, checked where it can break: a test that starts a child process
(`subprocess`, `multiprocessing`/`torch.multiprocessing` spawn, hence torchrun, `bam` runs,
notebooks' kernels, pip) must carry one of the process markers, or the fast tier would run it.
An unmarked test that tries fails at once, before the child starts, naming the marker to add.

Loaded by tests/conftest.py; `pytest -p tiers` loads it into a nested run (tests/test_tiers.py).
"""
from __future__ import annotations

import multiprocessing.util
import subprocess
from typing import Any, Callable

import pytest

# markers that say "this test starts processes" (docs/testing.md); `slow` and `gpu` do not say it
PROCESS_MARKERS = ("process", "distributed", "slurm", "notebook", "wheel")
# what the fast tier leaves out (setup.cfg registers each)
FULL_SUITE_MARKERS = ("slow", *PROCESS_MARKERS, "gpu")
# helpers that libraries start behind in-process code, once per process, in milliseconds: not the
# test's doing (multiprocessing's shared-memory bookkeeper, started by FFCV and DataLoader queues;
# typeshed_client, which jsonargparse uses to read type stubs, asking the interpreter for sys.path;
# joblib's loky counting physical cores with lscpu for scikit-learn's k-means and t-SNE)
LIBRARY_HELPERS = ("from multiprocessing.resource_tracker import main", "import sys, json; print(json.dumps(sys.path))",
                   "lscpu")


class TierGuard:
    """The test of one pytest session that is running now (setup, call or teardown)."""

    def __init__(self) -> None:
        self.current: pytest.Item | None = None

    def check(self, command: Any) -> None:
        item = self.current
        if item is None or any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
            return
        if isinstance(command, (list, tuple)) and any(helper in str(word) for word in command for helper in LIBRARY_HELPERS):
            return
        pytest.fail(f"{item.nodeid} starts a child process ({command!r}) but carries none of the markers "
                    f"{', '.join(PROCESS_MARKERS)}: add @pytest.mark.process (or the one that fits) so that the "
                    f"fast tier leaves it out", pytrace=False)


# sessions that are configured now, innermost last (pytester nests one inside another): only the
# innermost one is running a test
_SESSIONS: list[TierGuard] = []
_GUARD = pytest.StashKey[TierGuard]()


def _guarded(start: Callable[..., Any], command_of: Callable[..., Any]) -> Callable[..., Any]:
    def start_if_marked(*args: Any, **kwargs: Any) -> Any:
        if _SESSIONS:
            _SESSIONS[-1].check(command_of(*args, **kwargs))
        return start(*args, **kwargs)

    start_if_marked.tier_guarded = True  # type: ignore[attr-defined]
    return start_if_marked


def _install_once() -> None:
    """Both ways Python starts a new program: `subprocess.Popen` and multiprocessing's spawn /
    forkserver (used by `torch.multiprocessing.spawn`); fork-only DataLoader workers are the code
    under test's business and are not counted."""
    if not getattr(subprocess.Popen._execute_child, "tier_guarded", False):
        subprocess.Popen._execute_child = _guarded(subprocess.Popen._execute_child,  # type: ignore[method-assign]
                                                   lambda popen, args, *rest, **kw: args)
    if not getattr(multiprocessing.util.spawnv_passfds, "tier_guarded", False):
        multiprocessing.util.spawnv_passfds = _guarded(multiprocessing.util.spawnv_passfds,
                                                       lambda path, args, passfds: args)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help=f"the fast tier: leave out the tests marked {', '.join(FULL_SUITE_MARKERS)}")


def _full_suite_only(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) for name in FULL_SUITE_MARKERS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("fast"):
        _long_files_first(items)
        return
    left_out = [item for item in items if _full_suite_only(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


def _long_files_first(items: list[pytest.Item]) -> None:
    """The full suite runs the files with full-suite tests (the long ones) first, each file's tests
    still together and in order: the parallel workers of README's command (`-n 2 --dist loadfile
    --no-loadscope-reorder`, a whole file to a worker) take the long files early and end together
    on the short in-process files, instead of one worker running a long file alone at the end."""
    long_files = {item.path for item in items if _full_suite_only(item)}
    items.sort(key=lambda item: item.path not in long_files)  # stable: the order within each group stays


def pytest_configure(config: pytest.Config) -> None:
    _install_once()
    config.stash[_GUARD] = TierGuard()
    _SESSIONS.append(config.stash[_GUARD])


def pytest_unconfigure(config: pytest.Config) -> None:
    _SESSIONS.remove(config.stash[_GUARD])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    guard = item.config.stash[_GUARD]
    guard.current = item
    try:
        yield
    finally:
        guard.current = None

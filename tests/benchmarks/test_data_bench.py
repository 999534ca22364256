"""The data benchmark runs end to end at toy size (no timing assertions)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_data  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.slow  # 6-7 CPU-seconds: longer than a fast-tier test may take (a few seconds)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finaliser, see test_data_ffcv
def test_benchmark_runs_every_available_path(capsys):
    rows, decoders = bench_data.main(["--images", "6", "--size", "32", "--batch-size", "3", "--global-size", "24",
                                      "--local-size", "12", "--ffcv-modes", "jpg", "--repeats", "1",
                                      "--decode-sizes", "16", "64", "--decode-images", "4"])
    names = [name for name, *_ in rows]
    assert names[0].startswith("PIL") and any(name.startswith("cpu path") for name in names)
    assert any("FFCV" in name for name in names) == (importlib.util.find_spec("ffcv") is not None)
    assert all(cpu > 0 and wall > 0 for _, cpu, wall in rows)
    assert [(name, size) for name, size, _ in decoders] == [("JPEG", 16), ("JPEG", 64), ("PNG", 16), ("PNG", 64)]
    assert all(sorted(rates) == ["Pillow", "TorchCodec", "torchvision"] and min(rates.values()) > 0
               for *_, rates in decoders)
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and "| format | side px | TorchCodec | torchvision | TorchCodec / torchvision |" in printed

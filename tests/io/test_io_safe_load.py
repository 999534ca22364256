"""Weights-only loading: the types real checkpoints need load, code in a crafted pickle never runs."""
from __future__ import annotations

import argparse
import builtins
import functools
import http.server
import os
import pathlib
import threading
import zipfile
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from bam.io import UnsafeCheckpointError, load_checkpoint_file
from bam.io.safe_load import (NotACheckpointError, SafeCheckpointIO, _numpy_globals, is_remote,
                              secure_checkpoint_loading)


class RunsShellCommand:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsPython:
    """Unpickling this executes Python source that creates `marker`."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class Harmless:
    """A user type: refused unless the caller allows it."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


# the payload's function as the pickle names it ({module}.{name}) -> payload
PAYLOADS = {f"{os.system.__module__}.system": RunsShellCommand, "builtins.exec": RunsPython}


def _crafted_file(tmp_path: pathlib.Path, payload: type) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("refused", sorted(PAYLOADS))
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, refused):
    path, marker = _crafted_file(tmp_path, PAYLOADS[refused])
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    assert not marker.exists(), "the crafted pickle's code ran"
    message = str(error.value)
    assert refused in message and str(path) in message
    assert "untrusted" in message and "safe_globals" in message


def test_weights_only_is_asked_for_not_left_to_torchs_default(tmp_path, monkeypatch):
    """torch 2.5 (allowed by setup.cfg) defaults to unsafe loading, as does any torch with this
    variable set: the refusal must not depend on the default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = _crafted_file(tmp_path, RunsPython)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    assert not marker.exists(), "the crafted pickle's code ran"


def test_the_crafted_pickle_does_run_code_when_loaded_unsafely(tmp_path):
    # control: proves the refusal test above would see the marker if the payload had run
    path, marker = _crafted_file(tmp_path, RunsPython)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_types_of_the_authors_args_are_allowed(tmp_path):
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, scale=(0.25, 1.0), lr=np.float64(3e-4), epochs=np.int64(400),
        table=np.arange(6, dtype=np.float32).reshape(2, 3), output_dir=pathlib.Path("/out/bam"), resume=None,
    )
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": args, "epoch": 7}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["epoch"] == 7
    assert loaded["args"].lr == 3e-4 and isinstance(loaded["args"].lr, np.float64)
    assert loaded["args"].output_dir == pathlib.Path("/out/bam")
    np.testing.assert_array_equal(loaded["args"].table, args.table)
    assert vars(loaded["args"]).keys() == vars(args).keys()


def test_allowlist_is_scoped_to_the_load(tmp_path):
    path = tmp_path / "ns.pth"
    torch.save({"args": argparse.Namespace(arch="vit_base")}, path)
    load_checkpoint_file(path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # nothing was registered globally


def test_refusal_names_the_type_and_the_documented_opt_in_works(tmp_path):
    path = tmp_path / "user_type.pth"
    torch.save({"extra": Harmless(5)}, path)
    with pytest.raises(UnsafeCheckpointError, match="Harmless"):
        load_checkpoint_file(path)
    with torch.serialization.safe_globals([Harmless]):
        assert load_checkpoint_file(path)["extra"].value == 5


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere/last.ckpt"):
        load_checkpoint_file(missing)


def _rewrite_pickle(path: pathlib.Path, old: bytes, new: bytes) -> None:
    """Replace `old` (which must occur) by `new` in the pickle of the checkpoint at `path`: how a file
    written by another device or library version is made here."""
    with zipfile.ZipFile(path) as source:
        records = [(item, source.read(item.filename)) for item in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for item, data in records:
            if item.filename.endswith("data.pkl"):
                assert old in data, "torch's pickle layout changed: update this helper"
                data = data.replace(old, new)
            target.writestr(item, data)


def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path):
    path = tmp_path / "gpu.ckpt"
    torch.save({"w": torch.arange(3.0)}, path)
    # the storage location, a BINUNICODE string (4-byte length, then the text), as a GPU run writes it
    _rewrite_pickle(path, b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    loaded = load_checkpoint_file(path)["w"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, torch.arange(3.0))


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("mmap", [False, True])
def test_mmap_maps_the_file_only_when_asked(tmp_path, mmap):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.arange(4.0)}, path)
    tensor = load_checkpoint_file(path, mmap=mmap)["w"]
    assert torch.equal(tensor, torch.arange(4.0))
    assert _is_mapped(path) is mmap
    del tensor
    default = load_checkpoint_file(path)["w"]  # kept alive: a mapping would last as long as the tensor
    assert not _is_mapped(path) and torch.equal(default, torch.arange(4.0)), "mapping is not the default"


def _is_mapped(path: pathlib.Path) -> bool:
    """Whether this process has `path` memory-mapped (Linux's list of the process's mappings)."""
    return str(path) in pathlib.Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_downloaded_checkpoint_is_read_not_mapped(tmp_path):
    """Its temporary copy is deleted after the load: a mapping would hold a deleted file."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "served.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tensor = load_checkpoint_file(f"http://127.0.0.1:{server.server_address[1]}/served.ckpt", mmap=True)["w"]
    finally:
        server.shutdown()
        server.server_close()
    assert torch.equal(tensor, torch.arange(4.0))
    assert "bam-download-" not in pathlib.Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("mmap", [False, True])
def test_files_torch_wrote_before_1_6_load(tmp_path, mmap):
    """The legacy (non-zip) format cannot be memory-mapped: asking for it still loads the file."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0), "epoch": 2}, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint_file(path, mmap=mmap)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["epoch"] == 2


def test_legacy_crafted_pickle_is_refused_with_the_generic_message(tmp_path):
    path = tmp_path / "legacy_crafted.pth"
    marker = tmp_path / "code_ran"
    torch.save({"args": RunsPython(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    assert not marker.exists()
    assert f"refused to load {str(path)!r}: the file tried to load a type, which weights-only" in str(error.value)


def test_refusal_message_says_why_and_how_to_opt_in(tmp_path):
    path = tmp_path / "two_types.pth"
    torch.save({"a": Harmless(1), "b": argparse.ArgumentParser}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert len(refused) >= 2
    assert str(error.value) == (
        f"refused to load {str(path)!r}: the file tried to load type(s) {', '.join(refused)}, which weights-only "
        "loading does not allow, because unpickling it could run arbitrary code. Do not load files from untrusted "
        "sources. If you trust this file and the type is harmless, allow it explicitly: "
        "`with torch.serialization.safe_globals([TheType]): bam.io.load_checkpoint_file(path)`.")


@pytest.mark.parametrize("content", [b"", b"<html>502 Bad Gateway</html>", b"\x00" * 64])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    path = tmp_path / "download.ckpt"
    path.write_bytes(content)
    with pytest.raises(NotACheckpointError) as error:
        load_checkpoint_file(path)
    assert str(error.value) == (f"{str(path)!r} is not a checkpoint: it is not a complete file written by torch.save "
                                "(another format, an error page, or a truncated or empty file)")


@pytest.mark.parametrize("kept", [0.1, 0.3, 0.5, 0.9])
def test_a_truncated_legacy_file_says_it_ends_early(tmp_path, kept):
    """A pre-1.6 file cut short (an interrupted copy) stops the unpickler with a bare EOFError or
    IndexError, depending on where the cut falls."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(NotACheckpointError) as error:
        load_checkpoint_file(path)
    assert str(error.value) == f"{str(path)!r} is not a readable checkpoint: the file ends early or is damaged"


def test_a_damaged_archive_names_torchs_first_error_line(tmp_path):
    path = tmp_path / "damaged.ckpt"
    torch.save({"w": torch.arange(3.0)}, path)
    with zipfile.ZipFile(path) as archive:  # a zip whose pickle record is missing
        records = {item.filename: archive.read(item.filename) for item in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            if not name.endswith("data.pkl"):
                archive.writestr(name, data)
    with pytest.raises(NotACheckpointError) as error:
        load_checkpoint_file(path)
    message = str(error.value)
    assert message.startswith(f"{str(path)!r} is not a readable checkpoint (") and "data.pkl" in message
    assert "\n" not in message


def test_a_file_holding_something_else_than_a_dictionary_names_it(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(TypeError) as error:
        load_checkpoint_file(path)
    assert str(error.value) == f"{str(path)!r} holds a Tensor, not a checkpoint dictionary"


def test_only_http_addresses_count_as_remote():
    assert is_remote("https://example.org/a.ckpt") and is_remote("http://host/a.ckpt")
    assert not is_remote("/data/https/a.ckpt") and not is_remote("s3://bucket/a.ckpt")


def test_trainers_default_checkpoint_io_is_made_weights_only(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    secure_checkpoint_loading(trainer)
    io_plugin = trainer.strategy.checkpoint_io
    assert isinstance(io_plugin, SafeCheckpointIO)
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {}, "args": RunsPython(tmp_path / "code_ran")}, path)
    with pytest.raises(UnsafeCheckpointError):
        io_plugin.load_checkpoint(path, weights_only=False)
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    assert torch.equal(io_plugin.load_checkpoint(path)["state_dict"]["w"], torch.ones(1))


def test_a_checkpoint_io_the_user_chose_is_left_alone(tmp_path):
    class UserIO(TorchCheckpointIO):
        pass

    chosen = UserIO()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         plugins=[chosen])
    secure_checkpoint_loading(trainer)
    assert trainer.strategy.checkpoint_io is chosen


NUMERIC_DTYPES = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]


def _numpy_values() -> dict[str, Any]:
    return {code: (np.arange(3).astype(code), np.dtype(code).type(1)) for code in NUMERIC_DTYPES}


def _assert_numpy_values(loaded: dict[str, Any]) -> None:
    for code, (array, scalar) in _numpy_values().items():
        np.testing.assert_array_equal(loaded[code][0], array)
        assert loaded[code][0].dtype == array.dtype
        assert loaded[code][1] == scalar and loaded[code][1].dtype == scalar.dtype


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_numpy_values_of_every_numeric_dtype_load_whichever_numpy_wrote_them(tmp_path, numpy_module):
    """numpy 2 pickles name `numpy._core`, numpy 1 `numpy.core`: the file is rewritten to the other name."""
    path = tmp_path / "numpy.pth"
    torch.save({"args": _numpy_values()}, path)
    # the GLOBAL opcode: `c`, then the module and the name, each ending in a newline
    written = next(module for module in (b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                   if module in _pickle_of(path))
    _rewrite_pickle(path, written, f"c{numpy_module}\n".encode())
    _assert_numpy_values(load_checkpoint_file(path)["args"])
    # the list itself, built while this test runs (the module's copy is built at import)
    with torch.serialization.safe_globals(_numpy_globals()):
        _assert_numpy_values(torch.load(path, weights_only=True)["args"])


def _pickle_of(path: pathlib.Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))

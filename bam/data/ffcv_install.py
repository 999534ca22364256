"""FFCV is an optional dependency (``pip install .[ffcv]``): the one place that imports it or says,
in one line, how to install it. Both the converter (``bam.data.ffcv_convert``) and the loader
(``bam.data.ffcv_loader``) ask here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "FFCV is not installed: run `pip install 'bam-ssl[ffcv]'` (or scripts/install.sh), then retry"


def require_ffcv() -> ModuleType:
    """Import FFCV's loader module, or fail with one line saying how to install it."""
    try:
        importlib.import_module("ffcv.fields.decoders")
        return importlib.import_module("ffcv.loader")
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error

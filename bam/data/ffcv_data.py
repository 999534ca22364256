"""The old home of bam's FFCV support, kept so that configs and code naming
``bam.data.ffcv_data.FFCVDataModule`` (or its converter) keep working: the converter now lives in
``bam.data.ffcv_convert``, the loader in ``bam.data.ffcv_loader``.
"""
from bam.data.ffcv_convert import ConverterWorkerDied, main, write_beton, write_complete
from bam.data.ffcv_install import require_ffcv
from bam.data.ffcv_loader import FFCVDataModule, beton_labels

__all__ = ["ConverterWorkerDied", "FFCVDataModule", "beton_labels", "main", "require_ffcv", "write_beton",
           "write_complete"]

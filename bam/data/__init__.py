"""Data side of pretraining: the multi-crop recipe, its CPU and on-device implementations,
Lightning data modules (image folders, built-in datasets, FFCV) and k-NN evaluation loaders."""
from bam.data.builtin import BUILTIN_DATASETS, load_builtin
from bam.data.config import MultiCropConfig, ViewSpec
from bam.data.contrastive_crop import CropBoxes, compute_boxes, heatmap, heatmap_boxes
from bam.data.cpu_augment import CPUMultiCrop
from bam.data.datamodule import BuiltinDataModule, ImageFolderDataModule, SSLDataModule
from bam.data.device_augment import DeviceMultiCrop
from bam.data.ffcv_data import FFCVDataModule, write_beton
from bam.data.sources import ImageFiles, TensorImages, UnreadableImageWarning

__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataModule",
    "CPUMultiCrop",
    "CropBoxes",
    "DeviceMultiCrop",
    "FFCVDataModule",
    "ImageFiles",
    "ImageFolderDataModule",
    "MultiCropConfig",
    "SSLDataModule",
    "TensorImages",
    "UnreadableImageWarning",
    "ViewSpec",
    "compute_boxes",
    "heatmap",
    "heatmap_boxes",
    "load_builtin",
    "write_beton",
]

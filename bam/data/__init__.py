"""Data side of pretraining: the multi-crop recipe, its augmentation operations with their per-image
(CPU) and batched (device) drivers, datasets and collation, labelled splits, Lightning data
modules (image folders, built-in datasets, FFCV) and k-NN evaluation loaders."""
from bam.data.builtin import BUILTIN_DATASETS, load_builtin
from bam.data.config import MultiCropConfig, ViewSpec
from bam.data.contrastive_crop import CropBoxes, compute_boxes, heatmap, heatmap_boxes
from bam.data.cpu_augment import CPUMultiCrop
from bam.data.device_augment import DeviceMultiCrop
from bam.data.ffcv_convert import write_beton
from bam.data.ffcv_loader import FFCVDataModule
from bam.data.file_report import FileStatuses
from bam.data.image_decoding import DEFAULT_MAX_PIXELS, UnreadableImageError, decode_image_file
from bam.data.modules import BuiltinDataModule, ImageFolderDataModule, SSLDataModule
from bam.data.sources import ImageFiles, TensorImages
from bam.data.splits import image_splits

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_MAX_PIXELS",
    "BuiltinDataModule",
    "CPUMultiCrop",
    "CropBoxes",
    "DeviceMultiCrop",
    "FileStatuses",
    "FFCVDataModule",
    "ImageFiles",
    "ImageFolderDataModule",
    "MultiCropConfig",
    "SSLDataModule",
    "TensorImages",
    "UnreadableImageError",
    "ViewSpec",
    "compute_boxes",
    "decode_image_file",
    "heatmap",
    "heatmap_boxes",
    "image_splits",
    "load_builtin",
    "write_beton",
]

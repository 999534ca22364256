"""Crop counts of multi-crop training, checked in one place.

The data recipe (`MultiCropConfig`), the methods and the objectives each take crop counts; they
all ask `check_crop_counts`, so an impossible count reads the same wherever it is set.
"""
from __future__ import annotations


def check_crop_counts(num_global_crops: int, num_local_crops: int, minimum_crops: int = 1, needed_by: str = "",
                      prefix: str = "") -> None:
    """Reject impossible crop counts with a message naming the setting: at least one global crop,
    no negative number of local crops, and at least `minimum_crops` in all (`needed_by` says which
    objective needs more, and why). `prefix` names where the counts were set (e.g. "model ")."""
    if num_global_crops < 1:
        problem = f"num_global_crops must be at least 1, got {num_global_crops}"
    elif num_local_crops < 0:
        problem = f"num_local_crops must be >= 0, got {num_local_crops}"
    elif num_global_crops + num_local_crops < minimum_crops:
        problem = f"{needed_by} needs at least {minimum_crops} crops, got {num_global_crops + num_local_crops}"
    else:
        return
    raise ValueError(prefix + problem)


def check_crops_of_objective(num_crops: int, num_global_crops: int, minimum_crops: int = 1, needed_by: str = "") -> None:
    """`check_crop_counts` for an objective that is given all its crops (`num_crops`, global
    ones first): the rest are its local crops."""
    check_crop_counts(num_global_crops, num_crops - num_global_crops, minimum_crops, needed_by,
                      prefix=f"num_crops={num_crops}, num_global_crops={num_global_crops}: ")

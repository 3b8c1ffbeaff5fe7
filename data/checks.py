"""Start-of-run checks that a dataset can train or validate, and the message for a dataset not converted yet.

``DetectionDataset`` already refuses files it cannot read (data/annotations.py), splits that share
images and empty category lists. What a valid file can still hold that makes a run pointless, or
its numbers wrong, is checked here, once, before the model is built:

- ``check_train_split``: no image, or no box of the training classes (nothing to learn), is an
  error; classes without a training box (never detected) are a warning naming them; images without
  boxes (trained as background) are counted in the log.
- ``check_val_split``: no image or no box (no metric can be computed) is an error; images that are
  also training images (validation then measures memory, not generalisation) are a warning.
- ``missing_split_message``: a split file that does not exist, with the prep/ command that writes it
  and the splits that do exist.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List

from utils.errors import UserError

logger = logging.getLogger(__name__)

# How each known dataset is converted (see prep/README.md); any other name is a custom set.
PREP_COMMANDS = {
    "voc": "python prep/voc.py --devkit PATH/VOCdevkit --sets 2007:trainval 2012:trainval 2007:test",
    "coco": "python prep/coco.py --ann PATH/annotations/instances_SPLIT.json --image_dir PATH/SPLIT",
    "openimages": "python prep/openimages.py --split SPLIT --image_dir PATH/SPLIT ... (see prep/README.md)",
    "shapes": "python prep/shapes.py (or make demo)",
}
CUSTOM_PREP_COMMAND = (
    "python prep/voc.py --xml_dir XML_DIR --image_dir IMAGE_DIR --dataset {name} for VOC-style XML files, "
    "or prep/coco.py --dataset {name} for a COCO-style file (prep/README.md)"
)


def _name(dataset: Any) -> str:
    return f"{os.path.basename(os.path.normpath(dataset.dataset_root))}/{','.join(dataset.splits)}"


def missing_split_message(dataset_root: str, split: str) -> str:
    """Why ``<dataset_root>/annotations/<split>.json`` is missing, and the command that writes it."""
    name = os.path.basename(os.path.normpath(dataset_root))
    command = PREP_COMMANDS.get(name, CUSTOM_PREP_COMMAND.format(name=name))
    path = os.path.join(dataset_root, "annotations", f"{split}.json")
    if not os.path.isdir(dataset_root):
        return (
            f"dataset {name!r} not found: {dataset_root!r} does not exist. Convert it first: {command} "
            f"(or point --data_root at the folder that holds {name}/)"
        )
    annotations_dir = os.path.join(dataset_root, "annotations")
    found = (
        sorted(f[: -len(".json")] for f in os.listdir(annotations_dir) if f.endswith(".json"))
        if os.path.isdir(annotations_dir)
        else []
    )
    if found:
        return (
            f"{path}: no split {split!r} in dataset {name!r} (it has {', '.join(found)}); "
            f"convert it with: {command}"
        )
    return f"{path}: dataset {name!r} has no converted split yet; convert it with: {command}"


def check_train_split(dataset: Any) -> None:
    """Refuse a training set without a box to learn from; warn about classes without a training box.

    ``dataset`` is a DetectionDataset. Difficult and crowd boxes do not count: the matcher ignores them.
    """
    name = _name(dataset)
    if len(dataset) == 0:
        raise UserError(
            f"{name}: the training set has no image ({', '.join(dataset.annotation_files)}); check the "
            "conversion summary (every image may have been skipped) or --train_sets"
        )
    boxes_per_class = dataset.num_boxes_per_class.tolist()
    if sum(boxes_per_class) == 0:
        subset = " of the classes selected by --classes" if dataset.num_boxes_outside_classes else ""
        raise UserError(
            f"{name}: the training set has no box{subset} (difficult and crowd boxes do not train) in its "
            f"{len(dataset)} images: there is nothing to learn ({', '.join(dataset.annotation_files)}); "
            "check the conversion summary, --train_sets or --classes"
        )
    empty = [n for n, count in zip(dataset.class_names, boxes_per_class) if count == 0]
    if empty:
        logger.warning(
            "%s: %d of %d classes have no training box and will never be detected: %s%s",
            name,
            len(empty),
            len(boxes_per_class),
            ", ".join(empty[:20]),
            " ..." if len(empty) > 20 else "",
        )
    if dataset.num_images_without_boxes:
        logger.info(
            "%s: %d of %d training images have no box to learn from (they train as background)",
            name,
            dataset.num_images_without_boxes,
            len(dataset),
        )


def check_val_split(dataset: Any, train_set: Any | None = None) -> None:
    """Refuse a validation set without boxes; warn when its images are also training images."""
    name = _name(dataset)
    if len(dataset) == 0:
        raise UserError(
            f"{name}: the validation set has no image ({', '.join(dataset.annotation_files)}): give "
            "other --val_sets, or --no_val"
        )
    if int(dataset.num_boxes_per_class.sum()) == 0:
        raise UserError(
            f"{name}: the validation set has no box of the training classes (difficult and crowd boxes "
            f"are not scored) in its {len(dataset)} images, so no metric can be computed: give other "
            "--val_sets, or --no_val"
        )
    if train_set is None:
        return
    train_paths = {os.path.normpath(train_set.image_path(i)) for i in range(len(train_set))}
    shared: List[str] = [
        dataset.image_path(i)
        for i in range(len(dataset))
        if os.path.normpath(dataset.image_path(i)) in train_paths
    ]
    if shared:
        logger.warning(
            "%s: %d of %d validation images are also training images (e.g. %s): validation then "
            "measures how well the model remembers them",
            name,
            len(shared),
            len(dataset),
            ", ".join(shared[:3]),
        )

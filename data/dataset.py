"""Detection dataset over one or more split files of the common annotation format.

``<data_root>/<dataset>/annotations/<split>.json`` (see data/annotations.py); image files are read
from ``<data_root>/<dataset>/<file_name>``. The boxes of all splits are held in flat arrays
(offsets per image), so Open Images sized sets cost a few arrays, not millions of small objects.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from data.annotations import load_annotations
from data.checks import missing_split_message
from data.collate import SkippedSample
from data.image_io import ImageReadError, read_image
from data.transforms import build_transforms
from utils.errors import UserError

logger = logging.getLogger(__name__)


def _category_key(category: Dict[str, Any]) -> Tuple[Any, ...]:
    return category["id"], category["name"], category.get("mid")


def resolve_classes(categories: List[Dict[str, Any]], classes: Sequence[str], source: str) -> List[int]:
    """Positions in ``categories`` of the requested classes (names, or Open Images mids), in the given order.

    Raises ValueError naming the unknown or repeated entries and ``source``.
    """
    by_name = {c["name"]: i for i, c in enumerate(categories)}
    by_mid = {c["mid"]: i for i, c in enumerate(categories) if "mid" in c}
    unknown = [c for c in classes if c not in by_name and c not in by_mid]
    if unknown:
        raise UserError(
            f"{source}: unknown class(es) {unknown} in the class subset "
            f"(known names: {[c['name'] for c in categories][:20]}{' ...' if len(categories) > 20 else ''})"
        )
    positions = [by_name[c] if c in by_name else by_mid[c] for c in classes]
    if len(set(positions)) != len(positions):
        repeated = sorted({c for c, p in zip(classes, positions) if positions.count(p) > 1})
        raise UserError(f"{source}: class(es) {repeated} given more than once in the class subset")
    if not positions:
        raise UserError(f"{source}: the class subset is empty")
    return positions


class DetectionDataset(Dataset):
    """Images and boxes of one dataset's splits, as (Tensor[3, H, W], target) through ``transforms``.

    Args:
        dataset_root (str): ``<data_root>/<dataset>``.
        splits (list[str]): split names, read from ``<dataset_root>/annotations/<split>.json``. They must
            share the same categories (same ids, names and order) and no image id.
        transforms (callable): ``(image np.uint8[H, W, 3] RGB, target of numpy arrays) -> (image, target)``,
            e.g. data.transforms.build_transforms(...). None returns the raw numpy image and target.
        classes (list[str] | None): a class subset (names or Open Images mids). Labels become positions
            in this list; boxes of other classes are kept with label -1 (ignore regions for the loss) and
            counted in ``num_boxes_outside_classes``.
        skip_bad_images (bool): on an unreadable image return a SkippedSample (after a warning naming
            the file) instead of raising ImageReadError.

    Attributes:
        class_names (list[str]), category_ids (list[int]): the (subset) classes in label order, with
            their original ids (for writing COCO results).
        image_ids (list[int]), image_sizes (np.ndarray[M, 2], (h, w) from the annotation files),
        image_labels (list[np.ndarray]): the distinct labels >= 0 in each image (for samplers),
        annotation_files (list[str]), num_boxes_outside_classes (int),
        num_degenerate_boxes (int): boxes dropped because they have no area after clipping to the image
            (the annotation format accepts them; the matcher cannot use them),
        num_boxes_per_class (np.ndarray[K] int64): boxes that train or are scored (not difficult, not
            crowd) per class, num_images_without_boxes (int): images with none of them.

    Raises UserError naming the file for a split that is missing (with the prep/ command that writes
    it), splits that share image ids or image files, or no category. A split without images loads
    (train.py refuses it at start, see data/checks.py).

    A target (after ToTensorNormalize) holds boxes Tensor[G, 4] float32 xyxy in input pixels, labels
    Tensor[G] int64, difficult / iscrowd Tensor[G] bool, image_id int, file_name str (the image path),
    orig_size / size Tensor[2] int64 (h, w), scale Tensor[2] float32 (sx, sy) and num_cropped_out int.
    Difficult and crowd boxes are always returned (the matcher ignores them); images without boxes
    are kept as negatives.
    """

    def __init__(
        self,
        dataset_root: str,
        splits: Sequence[str],
        transforms: Callable | None,
        classes: Sequence[str] | None = None,
        skip_bad_images: bool = False,
    ):
        if isinstance(splits, str) or not splits:
            raise UserError(f"splits must be a non-empty list of split names, got {splits!r}")
        self.dataset_root = dataset_root
        self.splits = list(splits)
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self.annotation_files = [os.path.join(dataset_root, "annotations", f"{s}.json") for s in self.splits]
        self._coco_gt: Dict[bool, Dict[str, Any]] = {}  # all_classes -> ground truth

        for split, path in zip(self.splits, self.annotation_files):
            if not os.path.isfile(path):
                raise UserError(missing_split_message(dataset_root, split))
        cocos = [load_annotations(path) for path in self.annotation_files]
        self.categories = cocos[0]["categories"]
        if not self.categories:
            raise UserError(
                f"{self.annotation_files[0]}: the category list is empty, so there is no class to train "
                "or score (was the conversion given any class, e.g. prep/voc.py --classes?)"
            )
        for path, coco in zip(self.annotation_files[1:], cocos[1:]):
            if [_category_key(c) for c in coco["categories"]] != [_category_key(c) for c in self.categories]:
                raise UserError(
                    f"{path} and {self.annotation_files[0]} have different categories (ids, names or "
                    f"order); splits read together must share one category list"
                )
        self._check_image_ids_unique(cocos)

        num_categories = len(self.categories)
        if classes is None:
            subset = list(range(num_categories))
        else:
            subset = resolve_classes(self.categories, list(classes), self.annotation_files[0])
        self.class_names = [self.categories[i]["name"] for i in subset]
        self.category_ids = [int(self.categories[i]["id"]) for i in subset]
        self._subset_positions = subset
        # full label (position in the file's categories) -> subset label, -1 outside the subset
        subset_label = np.full(num_categories, -1, dtype=np.int64)
        subset_label[subset] = np.arange(len(subset))

        self._load_boxes(cocos, subset_label)
        self.num_boxes_outside_classes = int((self._labels < 0).sum())
        if classes is not None:
            logger.info(
                "%s: class subset of %d / %d classes; %d boxes of other classes kept as ignore regions",
                ", ".join(self.splits),
                len(subset),
                num_categories,
                self.num_boxes_outside_classes,
            )

    @staticmethod
    def _image_ids(coco: Dict[str, Any]) -> np.ndarray:
        return np.asarray([im["id"] for im in coco["images"]], dtype=np.int64)

    def _check_image_ids_unique(self, cocos: List[Dict[str, Any]]) -> None:
        """Splits read together share no image id and no image file (load_annotations checks one file)."""
        ids = [self._image_ids(c) for c in cocos]
        all_ids = np.concatenate(ids)
        unique, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            repeated = unique[counts > 1]
            files = [path for path, i in zip(self.annotation_files, ids) if np.isin(i, repeated).any()]
            raise UserError(
                f"{len(repeated)} image id(s) appear in more than one of {files} "
                f"(e.g. {repeated[:5].tolist()}); splits read together must not share image ids"
            )
        if len(cocos) > 1:
            first_split: Dict[str, str] = {}
            for path, coco in zip(self.annotation_files, cocos):
                for image in coco["images"]:
                    key = os.path.normpath(image["file_name"])
                    other = first_split.setdefault(key, path)
                    if other != path:
                        raise UserError(
                            f"image file {image['file_name']!r} is listed by {other} and by {path} "
                            f"(image id {image['id']}): an image read twice trains twice, and as background "
                            "where one split has no box for it; give splits without shared images"
                        )

    def _load_boxes(self, cocos: List[Dict[str, Any]], subset_label: np.ndarray) -> None:
        """Flat per-box arrays sorted by image, with ``_offsets[i]:_offsets[i + 1]`` the boxes of image i."""
        images = [im for coco in cocos for im in coco["images"]]
        self.image_ids = [int(im["id"]) for im in images]
        self.file_names = [im["file_name"] for im in images]
        self.image_sizes = np.asarray([(im["height"], im["width"]) for im in images], dtype=np.float64)
        self.image_sizes = np.round(self.image_sizes).astype(np.int64).reshape(-1, 2)

        anns = [a for coco in cocos for a in coco["annotations"]]
        num_anns = len(anns)
        # np.fromiter over flat values: several times faster than np.asarray on millions of small lists
        ann_ids = np.fromiter((a["id"] for a in anns), dtype=np.int64, count=num_anns)
        xywh = np.fromiter(
            itertools.chain.from_iterable(a["bbox"] for a in anns), dtype=np.float64, count=4 * num_anns
        ).reshape(-1, 4)
        category_ids = np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=num_anns)
        iscrowd = np.fromiter((a["iscrowd"] for a in anns), dtype=bool, count=num_anns)
        difficult = np.fromiter((a.get("difficult", 0) for a in anns), dtype=bool, count=num_anns)
        # image index of every box (image ids are unique over the splits)
        id_order = np.argsort(np.asarray(self.image_ids, dtype=np.int64))
        sorted_ids = np.asarray(self.image_ids, dtype=np.int64)[id_order]
        ann_image_ids = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=num_anns)
        image_index = id_order[np.searchsorted(sorted_ids, ann_image_ids)] if len(anns) else ann_image_ids
        # category id -> full label (position in the categories list) -> subset label
        cat_ids = np.asarray([c["id"] for c in self.categories], dtype=np.int64)
        cat_order = np.argsort(cat_ids)
        full_labels = (
            cat_order[np.searchsorted(cat_ids[cat_order], category_ids)] if len(anns) else category_ids
        )
        labels = subset_label[full_labels]

        # xywh -> xyxy, clipped to the image (the format tolerates boxes a hair past the border)
        heights, widths = self.image_sizes[image_index, 0], self.image_sizes[image_index, 1]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = np.clip(boxes, 0, np.stack([widths, heights, widths, heights], axis=1))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self.num_degenerate_boxes = int((~valid).sum())
        if self.num_degenerate_boxes:
            logger.warning(
                "%s: dropped %d boxes with zero width or height after clipping to the image "
                "(e.g. annotation ids %s)",
                ", ".join(self.annotation_files),
                self.num_degenerate_boxes,
                ann_ids[~valid][:5].tolist(),
            )

        order = np.argsort(image_index[valid], kind="stable")
        self._boxes = boxes[valid][order].astype(np.float32)
        self._labels = labels[valid][order]
        self._difficult = difficult[valid][order]
        self._iscrowd = iscrowd[valid][order]
        counts = np.bincount(image_index[valid], minlength=len(images))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        # distinct labels >= 0 per image, for the class-aware samplers
        box_image = np.repeat(np.arange(len(images)), counts)
        usable = (self._labels >= 0) & ~self._difficult & ~self._iscrowd
        self.num_boxes_per_class = np.bincount(self._labels[usable], minlength=int((subset_label >= 0).sum()))
        self.num_images_without_boxes = int(
            (np.bincount(box_image[usable], minlength=len(images)) == 0).sum()
        )
        positive = self._labels >= 0
        num_labels = len(subset_label) + 1
        pairs = np.unique(box_image[positive] * num_labels + self._labels[positive])
        pair_images, pair_labels = pairs // num_labels, pairs % num_labels
        splits = np.cumsum(np.bincount(pair_images, minlength=len(images)))[:-1]
        self.image_labels = np.split(pair_labels.astype(np.int64), splits) if len(images) else []

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.dataset_root, self.file_names[index])

    def missing_images(self) -> List[str]:
        """Paths of the annotated images that do not exist, in dataset order.

        One directory listing per image folder instead of one stat per image: a few seconds for the
        1.7M images of Open Images, so scripts can check before an hour of training, not at the image.
        """
        paths = [self.image_path(i) for i in range(len(self))]
        listings: Dict[str, set] = {}
        for folder in {os.path.dirname(p) for p in paths}:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return [p for p in paths if os.path.basename(p) not in listings[os.path.dirname(p)]]

    def raw_target(self, index: int) -> Dict[str, Any]:
        """Target of image ``index`` from the annotations (numpy arrays, original pixels); reads no image."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return {
            "boxes": self._boxes[start:end].copy(),
            "labels": self._labels[start:end].copy(),
            "difficult": self._difficult[start:end].copy(),
            "iscrowd": self._iscrowd[start:end].copy(),
            "image_id": self.image_ids[index],
            "file_name": self.image_path(index),
            "orig_size": self.image_sizes[index].copy(),
        }

    def load_image(self, index: int) -> np.ndarray:
        """np.uint8[H, W, 3] RGB; ImageReadError when unreadable or not of the annotated size."""
        path = self.image_path(index)
        image = read_image(path)
        expected_h, expected_w = self.image_sizes[index]
        if image.shape[:2] != (expected_h, expected_w):
            hint = (
                " (transposed: the annotations were made without applying the EXIF orientation)"
                if image.shape[:2] == (expected_w, expected_h)
                else ""
            )
            raise ImageReadError(
                path,
                f"the image is {image.shape[0]} x {image.shape[1]} (h x w) but annotation file(s) "
                f"{self.annotation_files} say {expected_h} x {expected_w}{hint}",
            )
        return image

    def __getitem__(self, index: int) -> Tuple[Any, Dict[str, Any]] | SkippedSample:
        try:
            image = self.load_image(index)
        except ImageReadError as e:
            if not self.skip_bad_images:
                raise
            logger.warning("skipping image %s: %s", e.path, e.reason)
            return SkippedSample(e.path, e.reason)
        target = self.raw_target(index)
        if self.transforms is None:
            return image, target
        return self.transforms(image, target)

    def coco_gt(self, all_classes: bool = False) -> Dict[str, Any]:
        """Ground truth of all splits as one common-format dict, for the evaluators.

        Only the (subset) classes, in label order, and their annotations; annotation ids are renumbered
        from 1 when the splits' ids collide (pycocotools indexes by id and treats id 0 as unmatched).
        ``all_classes``: every category of the files and all annotations, whatever the subset (the Open
        Images metric expands the class hierarchy over every class before it keeps the subset's).
        Image records (with any verified labels) are as in the files. Built on first call by re-reading
        the files (training sets never keep it), then cached: do not modify it.
        """
        # Without a subset (or with one listing every class in file order) both are the same dict.
        all_classes = all_classes or self._subset_positions == list(range(len(self.categories)))
        if all_classes not in self._coco_gt:
            positions = range(len(self.categories)) if all_classes else self._subset_positions
            categories = [self.categories[i] for i in positions]
            keep_ids = {int(c["id"]) for c in categories}
            cocos = [load_annotations(path) for path in self.annotation_files]
            annotations = [a for coco in cocos for a in coco["annotations"] if a["category_id"] in keep_ids]
            ids = [a["id"] for a in annotations]
            if len(set(ids)) != len(ids) or 0 in ids:
                annotations = [{**a, "id": i + 1} for i, a in enumerate(annotations)]
            self._coco_gt[all_classes] = {
                "images": [im for coco in cocos for im in coco["images"]],
                "annotations": annotations,
                "categories": categories,
            }
        return self._coco_gt[all_classes]

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({self.dataset_root!r}, splits={self.splits}, {len(self)} images, "
            f"{len(self._boxes)} boxes, {len(self.class_names)} classes)"
        )


def parse_split_names(splits: str | Sequence[str]) -> List[str]:
    """'trainval2007,trainval2012' (or a list) -> ['trainval2007', 'trainval2012']."""
    names = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else [s.strip() for s in splits]
    names = [s for s in names if s]
    if not names:
        raise UserError(f"no split names in {splits!r}")
    return names


# A --classes value ending so is a file name, never a class list.
CLASS_FILE_SUFFIXES = (".txt", ".csv", ".json", ".list")


def parse_classes(value: str | Sequence[str] | None) -> List[str] | None:
    """--classes: None, a file with one name or mid per line (blank lines and '#' comments skipped), or
    a comma list."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):  # already resolved, e.g. the class names stored in a checkpoint
        return [str(v) for v in value]
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            names = [line.strip() for line in f]
        names = [n for n in names if n and not n.startswith("#")]
        source = f"--classes file {value!r}"
    elif value.lower().endswith(CLASS_FILE_SUFFIXES):  # meant as a file: not a class named "bin_0.txt"
        raise UserError(f"--classes file {value!r} does not exist")
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
        source = f"--classes {value!r}"
    if not names:
        raise UserError(f"{source} names no class")
    return names


def check_same_classes(
    dataset: DetectionDataset, class_names: Sequence[str], category_ids: Sequence[int], trained_on: str
) -> None:
    """Raise ValueError unless ``dataset`` has the classes a model was trained with, in the same order.

    A model's label i is the i-th training class: on a split whose category list differs (another
    order, another id, a missing class) every detection would be scored as the wrong class.
    """
    ours = list(zip(dataset.class_names, dataset.category_ids))
    theirs = list(zip(class_names, (int(c) for c in category_ids)))
    if ours == theirs:
        return
    diffs = [f"label {i}: {a} here, {b} in training" for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if len(ours) != len(theirs):
        diffs.append(f"{len(ours)} classes here, {len(theirs)} in training")
    raise UserError(
        f"{', '.join(dataset.annotation_files)} has other classes (name, id) than {trained_on}: "
        f"{'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}"
    )


def build_dataset(args: argparse.Namespace, split: str | Sequence[str], train: bool) -> DetectionDataset:
    """The dataset for ``split`` (a comma list such as args.train_sets / args.val_sets, or a list).

    Reads args.data_root, args.dataset, args.classes, args.skip_bad_images and, for the transforms,
    args.resize_mode, args.input_dim, args.min_size, args.max_size, args.augment and args.crop_rule
    (applied when ``train``): options of the common parser, with no defaults here.
    """
    transforms = build_transforms(
        train,
        args.resize_mode,
        input_dim=args.input_dim,
        min_size=args.min_size,
        max_size=args.max_size,
        augment=args.augment,
        crop_rule=args.crop_rule,
    )
    return DetectionDataset(
        os.path.join(args.data_root, args.dataset),
        parse_split_names(split),
        transforms,
        classes=parse_classes(args.classes),
        skip_bad_images=args.skip_bad_images,
    )

"""Open Images ground truth as arrays: hierarchy expansion and class subsets without per-box dicts.

``evaluate_oid`` used to expand the ground truth dict (a dict copy per box and ancestor, sets per image)
and then convert it to arrays; at Open Images validation size (40k images, ~300k boxes, 500 classes)
that took most of its time. ``oid_gt_arrays`` gives the same arrays, in the same order, directly:

- boxes: the original annotations first, then one copy per (box, ancestor) in annotation order and the
  ancestor order of ``load_hierarchy`` (exactly the dict path's order, which decides ties);
- the (image, class) pairs where a class is evaluated: verified-present labels and their ancestors,
  verified-absent labels and their descendants, and the classes of the (expanded) boxes;
- restricted to ``category_ids`` (in that order) after the expansion.

tests/test_oid_eval_reference.py keeps the dict path (``expand_ground_truth`` + ``select_categories``)
and checks this against it followed by ``gt_to_arrays``.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Iterable

import numpy as np

from metrics.arrays import gt_to_arrays, positions_of, unique_sorted
from utils.errors import UserError


def csr_from_lists(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ptr int64[K + 1], idx int64[sum of lengths]): row k is idx[ptr[k]:ptr[k + 1]]."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    idx = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(ptr[-1]))
    return ptr, idx


def expand_rows(values: np.ndarray, ptr: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, r) with r in row values[i] of a CSR map, i-major and in row order.

    Args:
        values (np.ndarray[N] int64): row of each item (e.g. the class of each box).
        ptr, idx: from ``csr_from_lists``.

    Returns:
        (src int64[P]: the item i of each pair, new int64[P]: the row entry).
    """
    counts = ptr[values + 1] - ptr[values]
    src = np.repeat(np.arange(len(values), dtype=np.int64), counts)
    offsets = np.arange(len(src), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return src, idx[np.repeat(ptr[values], counts) + offsets]


def image_label_pairs(gt: dict, category_index: dict[int, int], field: str) -> tuple[np.ndarray, np.ndarray]:
    """(image positions, class positions) of every entry of each image's ``field`` list."""
    images = gt["images"]
    lists = [img.get(field) or () for img in images]
    counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    try:
        flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(counts.sum()))
    except (TypeError, ValueError):
        flat = np.array([int(c) for c in chain.from_iterable(lists)], dtype=np.int64)
    img = np.repeat(np.arange(len(images), dtype=np.int64), counts)
    cls, known = positions_of(flat, category_index)
    if not known.all():
        first = int(np.flatnonzero(~known)[0])
        raise UserError(
            f"OID ground truth: image {images[img[first]]['id']} has verified labels of unknown category "
            f"{int(flat[first])}"
        )
    return img, cls


def oid_gt_arrays(
    gt: dict,
    ancestors: dict[str, list[str]] | None = None,
    category_ids: Iterable[int] | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[dict]]:
    """Arrays of an Open Images ground truth, expanded over the hierarchy and restricted to a subset.

    Args:
        gt (dict): common-format OID ground truth, not expanded.
        ancestors (dict[str, list[str]] | None): ``load_hierarchy(..., mids)`` of gt's categories, or None
            for no expansion.
        category_ids (Iterable[int] | None): keep these categories (in this order) after the expansion.

    Returns:
        (gta, evaluatable_keys, categories): ``gt_to_arrays``'s dict for the expanded, restricted ground
        truth; the sorted unique keys image position * K + class position of the classes evaluated in
        each image (K = number of kept classes); the kept category dicts.
    """
    gta = gt_to_arrays(gt)
    category_index = gta["category_index"]
    num_all = len(gta["category_ids"])
    present = image_label_pairs(gt, category_index, "verified_present")
    absent = image_label_pairs(gt, category_index, "verified_absent")
    box_cols = ("img", "cls", "boxes", "difficult", "iscrowd")
    if ancestors is not None:
        position_of_mid = {c["mid"]: k for k, c in enumerate(gt["categories"])}
        anc_lists = [
            [position_of_mid[a] for a in ancestors.get(c["mid"], []) if a in position_of_mid]
            for c in gt["categories"]
        ]
        desc_lists: list[list[int]] = [[] for _ in range(num_all)]
        for k, ancs in enumerate(anc_lists):
            for a in ancs:
                desc_lists[a].append(k)
        anc_ptr, anc_idx = csr_from_lists(anc_lists)
        desc_ptr, desc_idx = csr_from_lists(desc_lists)
        src, new_cls = expand_rows(gta["cls"], anc_ptr, anc_idx)
        for col in box_cols:
            copies = new_cls if col == "cls" else gta[col][src]
            gta[col] = np.concatenate([gta[col], copies])
        src, new_cls = expand_rows(present[1], anc_ptr, anc_idx)
        present = (np.concatenate([present[0], present[0][src]]), np.concatenate([present[1], new_cls]))
        src, new_cls = expand_rows(absent[1], desc_ptr, desc_idx)
        absent = (np.concatenate([absent[0], absent[0][src]]), np.concatenate([absent[1], new_cls]))
    label_img = np.concatenate([present[0], absent[0]])
    label_cls = np.concatenate([present[1], absent[1]])

    categories = list(gt["categories"])
    if category_ids is not None:
        category_ids = [int(c) for c in category_ids]
        unknown = [c for c in category_ids if c not in category_index]
        if unknown:
            raise UserError(f"select_categories: category ids {unknown[:10]} are not in the ground truth")
        new_pos = np.full(num_all, -1, dtype=np.int64)
        new_pos[[category_index[c] for c in category_ids]] = np.arange(len(category_ids))
        keep = new_pos[gta["cls"]] >= 0
        for col in box_cols:
            gta[col] = gta[col][keep]
        gta["cls"] = new_pos[gta["cls"]]
        keep_label = new_pos[label_cls] >= 0
        label_img, label_cls = label_img[keep_label], new_pos[label_cls[keep_label]]
        categories = [gt["categories"][category_index[c]] for c in category_ids]
        gta["category_ids"] = category_ids
        gta["category_index"] = {c: k for k, c in enumerate(category_ids)}
        gta["class_names"] = [str(c.get("name", c["id"])) for c in categories]
    num_classes = len(gta["category_ids"])
    keys = unique_sorted(
        np.concatenate([label_img * num_classes + label_cls, gta["img"] * num_classes + gta["cls"]])
    )
    return gta, keys, categories

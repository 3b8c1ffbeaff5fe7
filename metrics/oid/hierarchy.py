"""The Open Images class hierarchy, and the ground truth expanded over it.

The rules (which links count, the skipped root, an ancestor reached through two paths counted once, boxes
copied to every ancestor, verified-present labels to ancestors, verified-absent ones to descendants) are
those of the challenge metric: see metrics/oid/metric.py.
"""

import json
import logging
from collections.abc import Iterable

from utils.errors import UserError

logger = logging.getLogger(__name__)


def _parents_from_tree(tree: dict, source: str) -> dict[str, set[str]]:
    """child MID -> parent MIDs from the official nested {"LabelName", "Subcategory": [...]} JSON."""
    parents: dict[str, set[str]] = {}
    stack = [(tree, True)]
    while stack:
        node, is_root = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            raise UserError(f"{source}: hierarchy node without a string 'LabelName': {str(node)[:200]}")
        children = node.get("Subcategory", [])
        if not isinstance(children, list):
            raise UserError(f"{source}: 'Subcategory' of {node['LabelName']} must be a list")
        for child in children:
            if not isinstance(child, dict) or not isinstance(child.get("LabelName"), str):
                raise UserError(f"{source}: hierarchy node without a string 'LabelName': {str(child)[:200]}")
            child_parents = parents.setdefault(child["LabelName"], set())
            if not is_root:  # the root is a virtual "Entity" node, not a class (reference: skip_root)
                child_parents.add(node["LabelName"])
            stack.append((child, False))
    return parents


def load_hierarchy(path_or_dict: str | dict, mids: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Ancestor map of an Open Images class hierarchy.

    Args:
        path_or_dict (str | dict): the official hierarchy JSON (``bbox_labels_600_hierarchy.json``: nested
            {"LabelName": ..., "Subcategory": [...]} under a root that is skipped), as a path or the loaded
            dict; or a dict child MID -> list of parent MIDs (direct or not: the closure is taken).
        mids (Iterable[str] | None): restrict to these classes (e.g. the dataset's categories). Every one
            of them is a key; ancestors outside the set are left out, but the closure is taken over the
            whole hierarchy first, so a grandparent still counts when the parent is not selected.

    Returns:
        dict MID -> list of ancestor MIDs (each once; in ``mids`` order when given, else sorted).

    Raises:
        ValueError: unreadable file, malformed hierarchy, or a cycle.
    """
    source = path_or_dict if isinstance(path_or_dict, str) else "hierarchy"
    data = path_or_dict
    if isinstance(path_or_dict, str):
        try:
            with open(path_or_dict, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"load_hierarchy: cannot read {path_or_dict}: {err}") from err
    if isinstance(data, dict) and "LabelName" in data:
        parents = _parents_from_tree(data, source)
    elif isinstance(data, dict):
        parents = {}
        for child, plist in data.items():
            if not isinstance(child, str) or not isinstance(plist, (list, tuple, set)):
                raise UserError(
                    f"{source}: a child -> parents map needs str keys and list values ({child!r})"
                )
            parents[child] = {str(p) for p in plist}
    else:
        raise UserError(f"{source}: expected the nested hierarchy JSON or a child -> parents dict")

    closure: dict[str, set[str]] = {}
    for start in list(parents):
        # Iterative post-order DFS; a node on the current path seen again is a cycle.
        stack, on_path = [(start, iter(parents.get(start, ())))], {start}
        while stack:
            node, it = stack[-1]
            parent = next(it, None)
            if parent is None:
                stack.pop()
                on_path.discard(node)
                acc = set()
                for p in parents.get(node, ()):
                    acc.add(p)
                    acc |= closure.get(p, set())
                closure[node] = acc
            elif parent in on_path:
                raise UserError(f"{source}: the hierarchy has a cycle through {parent}")
            elif parent not in closure:
                stack.append((parent, iter(parents.get(parent, ()))))
                on_path.add(parent)

    if mids is None:
        return {mid: sorted(anc) for mid, anc in closure.items()}
    mids = list(mids)
    position = {mid: i for i, mid in enumerate(mids)}
    missing = [mid for mid in mids if mid not in closure]
    if missing:
        logger.warning(
            "load_hierarchy: %d of %d classes are not in the hierarchy (no ancestors): %s",
            len(missing),
            len(mids),
            ", ".join(missing[:10]),
        )
    return {
        mid: sorted((a for a in closure.get(mid, ()) if a in position), key=position.__getitem__)
        for mid in mids
    }


def descendants_from_ancestors(ancestors: dict[str, list[str]]) -> dict[str, list[str]]:
    """Invert an ancestor map: MID -> list of descendant MIDs (every key of ``ancestors`` is a key)."""
    descendants: dict[str, list[str]] = {mid: [] for mid in ancestors}
    for mid, ancs in ancestors.items():
        for a in ancs:
            descendants.setdefault(a, []).append(mid)
    return descendants


def _category_maps(
    gt: dict, ancestors: dict[str, list[str]]
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Ancestor and descendant maps from category id to category ids."""
    no_mid = [c["id"] for c in gt["categories"] if not c.get("mid")]
    if no_mid:
        raise UserError(f"OID hierarchy: categories {no_mid[:10]} have no 'mid'")
    id_of_mid = {c["mid"]: int(c["id"]) for c in gt["categories"]}
    anc_by_cat = {
        int(c["id"]): [id_of_mid[a] for a in ancestors.get(c["mid"], []) if a in id_of_mid]
        for c in gt["categories"]
    }
    desc_by_cat: dict[int, list[int]] = {cid: [] for cid in anc_by_cat}
    for cid, ancs in anc_by_cat.items():
        for a in ancs:
            desc_by_cat[a].append(cid)
    return anc_by_cat, desc_by_cat


def expand_image_labels(
    present: Iterable[int],
    absent: Iterable[int],
    anc_by_cat: dict[int, list[int]],
    desc_by_cat: dict[int, list[int]],
) -> tuple[list[int], list[int]]:
    """Verified-present labels plus their ancestors, verified-absent labels plus their descendants.

    Args:
        present, absent (Iterable[int]): category ids.
        anc_by_cat, desc_by_cat (dict[int, list[int]]): category id -> ancestor / descendant category ids.

    Returns:
        (present, absent): sorted lists of unique category ids.
    """
    present_out, absent_out = set(present), set(absent)
    for c in list(present_out):
        present_out.update(anc_by_cat.get(c, ()))
    for c in list(absent_out):
        absent_out.update(desc_by_cat.get(c, ()))
    return sorted(present_out), sorted(absent_out)


def expand_annotations(
    annotations: list[dict], anc_by_cat: dict[int, list[int]], first_id: int
) -> list[dict]:
    """Copies of each box for every ancestor class of its category (the originals are not included).

    Args:
        annotations (list[dict]): common-format annotations.
        anc_by_cat (dict[int, list[int]]): category id -> ancestor category ids.
        first_id (int): annotation id of the first copy; copies are numbered consecutively.

    Returns:
        list[dict]: the copies, each with ``category_id`` replaced, a new ``id`` and ``expanded_from`` (the
        original annotation id); every other field as in the original.
    """
    out = []
    next_id = first_id
    for a in annotations:
        for anc in anc_by_cat.get(int(a["category_id"]), ()):
            out.append({**a, "id": next_id, "category_id": anc, "expanded_from": a.get("id")})
            next_id += 1
    return out


def expand_ground_truth(gt: dict, ancestors: dict[str, list[str]]) -> dict:
    """Hierarchically expanded copy of a common-format OID ground truth (the input is not modified).

    Args:
        gt (dict): images with ``verified_present`` / ``verified_absent`` (category ids), annotations,
            categories with ``mid``.
        ancestors (dict[str, list[str]]): from ``load_hierarchy``.

    Returns:
        dict: the same structure with boxes copied to ancestor classes and image labels expanded.
    """
    anc_by_cat, desc_by_cat = _category_maps(gt, ancestors)
    first_id = max((int(a["id"]) for a in gt["annotations"]), default=0) + 1
    extra = expand_annotations(gt["annotations"], anc_by_cat, first_id)
    images = []
    num_present = num_absent = 0
    for img in gt["images"]:
        present, absent = expand_image_labels(
            img.get("verified_present", ()), img.get("verified_absent", ()), anc_by_cat, desc_by_cat
        )
        num_present += len(present) - len(set(img.get("verified_present", ())))
        num_absent += len(absent) - len(set(img.get("verified_absent", ())))
        images.append({**img, "verified_present": present, "verified_absent": absent})
    logger.info(
        "OID hierarchy expansion: +%d boxes, +%d verified-present and +%d verified-absent labels",
        len(extra),
        num_present,
        num_absent,
    )
    return {**gt, "images": images, "annotations": list(gt["annotations"]) + extra}

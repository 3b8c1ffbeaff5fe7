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

"""The classes of an Open Images conversion: the class descriptions, ``--classes`` and the hierarchy."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from utils.errors import UserError


@dataclass
class SelectedClasses:
    """The classes written to the annotation file: label ``i`` (category id i + 1) is ``mids[i]``.

    ``label_of_mid`` maps every MID of the class descriptions to its label, or -1 when it is known but
    not selected (what ``stream_boxes`` and ``stream_image_labels`` take).
    """

    mids: List[str]
    names: List[str]
    label_of_mid: Dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.mids)


def load_classes(class_descriptions: str, classes: str | None) -> SelectedClasses:
    """The classes of ``--class_descriptions`` that ``--classes`` selects (None: all), in its order."""
    all_mids, all_names = read_class_descriptions(class_descriptions)
    requested = parse_class_list(classes) if classes is not None else None
    selected = select_classes(requested, all_mids, all_names)
    mids = [all_mids[i] for i in selected]
    label_of_mid = dict.fromkeys(all_mids, -1)
    label_of_mid.update({mid: label for label, mid in enumerate(mids)})
    return SelectedClasses(mids, [all_names[i] for i in selected], label_of_mid)


def load_hierarchy_file(path: str | None, mids: List[str]) -> Tuple[Any, List[str]]:
    """``--hierarchy``: (the loaded JSON or None, the selected MIDs it does not name)."""
    if path is None:
        return None, []
    with open(path, encoding="utf-8") as f:
        try:
            hierarchy = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"--hierarchy: {path} is not valid JSON: {e}") from e
    in_hierarchy = set(hierarchy_mids(hierarchy, path))
    return hierarchy, [mid for mid in mids if mid not in in_hierarchy]


def read_class_descriptions(path: str) -> Tuple[List[str], List[str]]:
    """Read ``MID,Name`` rows (no header; a 'LabelName,DisplayName' header is skipped) -> (mids, names)."""
    mids: List[str] = []
    names: List[str] = []
    seen: Dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise UserError(f"{path}:{line_no}: expected 2 fields 'MID,Name', got {len(row)}: {row!r}")
            mid, name = row[0].strip(), row[1].strip()
            if line_no == 1 and mid == "LabelName":
                continue
            if not mid or not name:
                raise UserError(f"{path}:{line_no}: empty MID or name: {row!r}")
            if mid in seen:
                raise UserError(f"{path}:{line_no}: MID {mid!r} already defined on line {seen[mid]}")
            seen[mid] = line_no
            mids.append(mid)
            names.append(name)
    if not mids:
        raise UserError(f"{path}: no classes in the class descriptions file")
    return mids, names


def parse_class_list(value: str) -> List[str]:
    """``--classes``: a file (one per line, blank lines and '#' comments skipped) or a comma list."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8-sig") as f:
            items = [line.strip() for line in f]
        return [item for item in items if item and not item.startswith("#")]
    return [item.strip() for item in value.split(",") if item.strip()]


def select_classes(requested: Sequence[str] | None, mids: List[str], names: List[str]) -> List[int]:
    """Indices into (mids, names) of the requested classes, in the requested order.

    A token matches a MID first, then a name exactly, then a name case-insensitively (must be unique).
    Raises ValueError naming ``--classes`` for unknown, ambiguous or repeated classes.
    """
    if requested is None:
        return list(range(len(mids)))
    index_of_mid = {mid: i for i, mid in enumerate(mids)}
    indices_of_name: Dict[str, List[int]] = {}
    indices_of_lower: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        indices_of_name.setdefault(name, []).append(i)
        indices_of_lower.setdefault(name.lower(), []).append(i)
    selected: List[int] = []
    unknown: List[str] = []
    ambiguous: List[str] = []
    for token in requested:
        if token in index_of_mid:
            candidates = [index_of_mid[token]]
        else:
            candidates = indices_of_name.get(token) or indices_of_lower.get(token.lower(), [])
        if not candidates:
            unknown.append(token)
        elif len(candidates) > 1:
            ambiguous.append(f"{token!r} ({', '.join(mids[i] for i in candidates)})")
        else:
            selected.append(candidates[0])
    problems = []
    if unknown:
        problems.append(f"unknown classes (not a MID or name of the class descriptions): {unknown}")
    if ambiguous:
        problems.append(f"names shared by several MIDs, use the MID: {', '.join(ambiguous)}")
    repeated = sorted({names[i] for i in selected if selected.count(i) > 1})
    if repeated:
        problems.append(f"classes given more than once: {repeated}")
    if not requested:
        problems.append("no classes given")
    if problems:
        raise UserError("--classes: " + "; ".join(problems))
    return selected


def hierarchy_mids(hierarchy: Any, path: str) -> List[str]:
    """All LabelName MIDs of a nested {"LabelName", "Subcategory": [...], "Part": [...]} tree."""
    found: List[str] = []
    stack = [hierarchy]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            raise UserError(f"{path}: hierarchy node without a string 'LabelName': {str(node)[:200]}")
        found.append(node["LabelName"])
        for key in ("Subcategory", "Part"):
            children = node.get(key, [])
            if not isinstance(children, list):
                raise UserError(f"{path}: {key!r} of {node['LabelName']} must be a list")
            stack.extend(children)
    return found

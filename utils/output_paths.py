"""Output names for per-image outputs (demo.py, extract_features.py) that never overwrite each other.

Each input keeps its path relative to the deepest folder that holds all inputs, without its extension:
``train/000000.png`` and ``val/000000.png`` become ``train/000000`` and ``val/000000``. Inputs whose
names still collide (``x.png`` and ``x.jpg`` in one folder) keep their extension in the stem
(``x_png``, ``x_jpg``), with a warning; a file named twice (directly and through its folder) is
processed once, and counted.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import List, Sequence, Tuple

from utils.errors import UserError

logger = logging.getLogger(__name__)


def unique_files(files: Sequence[str]) -> Tuple[List[str], int]:
    """``files`` without repeats of the same file (by real path), first occurrence kept; and how many
    repeats were dropped (logged)."""
    seen, kept = set(), []
    for path in files:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    num_repeats = len(files) - len(kept)
    if num_repeats:
        logger.warning("%d image(s) named more than once are processed once", num_repeats)
    return kept, num_repeats


def output_stems(files: Sequence[str]) -> List[str]:
    """One relative output stem per input file (see the module doc), all different.

    Raises UserError when two inputs would still share an output name.
    """
    if not files:
        return []
    absolute = [os.path.abspath(f) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    relative = [os.path.relpath(p, root) for p in absolute]
    stems = [os.path.splitext(r)[0] for r in relative]
    counts = Counter(stems)
    clashing = [i for i, s in enumerate(stems) if counts[s] > 1]
    for i in clashing:
        stem, ext = os.path.splitext(relative[i])
        stems[i] = f"{stem}_{ext.lstrip('.')}" if ext else stem
    if clashing:
        logger.warning(
            "%d inputs share a name up to the extension; their outputs keep it: %s",
            len(clashing),
            ", ".join(f"{relative[i]} -> {stems[i]}" for i in clashing[:6]),
        )
    final = Counter(stems)
    still = sorted({relative[i] for i, s in enumerate(stems) if final[s] > 1})
    if still:
        raise UserError(f"these inputs would write the same output files: {still[:6]}; rename them")
    return stems

"""Per-split file checks for ``inspect_dataset``: missing and unreadable images."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dcml.data.folder import is_readable
from dcml.data.records import ImageRecords

NUM_EXAMPLES = 5


def summarize_split(records: ImageRecords, *, check_images: bool = True, workers: int = 8) -> dict[str, Any]:
    """JSON-able counts of one split.

    ``{"images", "classes", "missing", "unreadable", "missing_examples", "unreadable_examples"}``;
    ``missing`` counts listed files that do not exist; ``unreadable`` counts existing
    files PIL cannot decode, or is ``None`` when ``check_images`` is false (decoding a
    large benchmark takes minutes; existence checks are cheap and always done).
    """
    present = [path for path in records.paths if os.path.isfile(path)]
    present_set = set(present)
    missing = [path for path in records.paths if path not in present_set]
    summary: dict[str, Any] = {
        "images": len(records),
        "classes": records.num_classes,
        "missing": len(missing),
        "unreadable": None,
        "missing_examples": missing[:NUM_EXAMPLES],
        "unreadable_examples": [],
    }
    if check_images:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            readable = list(pool.map(is_readable, present, chunksize=64))
        unreadable = [path for path, ok in zip(present, readable, strict=True) if not ok]
        summary["unreadable"] = len(unreadable)
        summary["unreadable_examples"] = unreadable[:NUM_EXAMPLES]
    return summary

"""JSON files written atomically: a reader (the report, another rank, a resumed run) never sees half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _jsonable(o: Any):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)

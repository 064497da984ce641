"""The folder of what parallelkit measures or prepares once and keeps (calibrations, footprints, tokenized
corpora): PARALLELKIT_CACHE, else ~/.cache/parallelkit."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PARALLELKIT_CACHE") or Path.home() / ".cache" / "parallelkit")

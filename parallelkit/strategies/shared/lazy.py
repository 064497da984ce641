"""A backend's library, imported when a worker first uses it: a strategy's planning face (options, layout,
checks, label, memory, comm) imports without it, so estimate and the pre-flight never load DeepSpeed or
FairScale (Lightning Fabric imports its optional backends the same way)."""
from __future__ import annotations

import importlib


class LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


def lazy(name: str) -> LazyModule:
    return LazyModule(name)

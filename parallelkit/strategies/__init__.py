"""The backends, one file each, by family (torch/, deepspeed/, fairscale/), and what they share (shared/).

Configs saved before the backends were arranged by family (run folders, native checkpoints) name their old
modules (``parallelkit.strategies.ddp.DDPStrategy``); those names still import, for one release, as the
moved modules (``MOVED``).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {"single": "torch.single", "ddp": "torch.ddp", "fsdp": "torch.fsdp", "fsdp1": "torch.fsdp1",
         "torch_pipe": "torch.pipe", "deepspeed_pipe": "deepspeed.pipe", "neox_3d": "deepspeed.neox_3d",
         "fairscale_oss": "fairscale.oss", "fairscale_pipe": "fairscale.pipe", "fairscale_tp": "fairscale.tp",
         "fairscale_fsdp": "fairscale.fsdp"}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``parallelkit.strategies.<old>`` as the module it moved to (the same classes)."""

    def find_spec(self, name, path, target=None):
        head, _, leaf = name.rpartition(".")
        return importlib.util.spec_from_loader(name, self) if head == __name__ and leaf in MOVED else None

    def exec_module(self, module) -> None:
        moved = importlib.import_module(f"{__name__}.{MOVED[module.__name__.rpartition('.')[2]]}")
        module.__dict__.update({k: v for k, v in vars(moved).items() if not k.startswith("__")})


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())

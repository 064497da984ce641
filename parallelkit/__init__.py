"""parallelkit: the same GPT on the same data under every distributed-training backend, measured side by side."""
from __future__ import annotations

__version__ = "0.1.0"
TORCH_NEEDED = (2, 6)  # torch.distributed.fsdp.fully_shard, torch.accelerator


def _check_torch() -> None:
    """One line, not a traceback, when torch is missing or older than the code needs."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    need = ".".join(map(str, TORCH_NEEDED))
    try:
        have = version("torch")
    except PackageNotFoundError:
        print(f"parallelkit: torch is not installed: run bash scripts/setup.sh, or pip install 'torch>={need}'",
              file=sys.stderr)
        raise SystemExit(2) from None
    try:
        major, minor = (int(x) for x in have.split("+")[0].split(".")[:2])
    except ValueError:
        return  # a version string we cannot read (a source build): let it run
    if (major, minor) < TORCH_NEEDED:
        print(f"parallelkit: torch {have} is too old: parallelkit needs torch >= {need} (fully_shard, "
              f"torch.accelerator); upgrade it: pip install 'torch>={need}'", file=sys.stderr)
        raise SystemExit(2)


_check_torch()

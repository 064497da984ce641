#!/usr/bin/env bash
# Install parallelkit and its backends into the current Python environment.
#   bash scripts/setup.sh           # torch (CPU build if there is no GPU), deepspeed, fairscale, hydra, ...
#   bash scripts/setup.sh --nvme    # also Debian's libaio-dev, which DeepSpeed's NVMe offload (ZeRO-Infinity) needs
#   bash scripts/setup.sh --slurm   # also Hydra's submitit launcher, for SLURM sweeps
#   bash scripts/setup.sh --ops-only [--nvme]  # only (re)build DeepSpeed's ops, e.g. after upgrading torch or DeepSpeed
# DeepSpeed's C++ ops are built here, into torch's extension cache (TORCH_EXTENSIONS_DIR, default
# ~/.cache/torch_extensions), rather than inside the first run's workers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=test
for arg in "$@"; do
  case "$arg" in
    --nvme) nvme=1 ;;
    --slurm) extras="$extras,slurm" ;;
    --ops-only) ops_only=1 ;;
    *) echo "setup.sh: unknown option $arg (use --nvme, --slurm, --ops-only)" >&2; exit 2 ;;
  esac
done

build_ops() {
  # DeepSpeed compiles an op the first time a run needs it, inside that run's workers: its shared-memory
  # collectives (deepspeed_shm_comm) in every DeepSpeed job on CPU, CPU Adam (cpu_adam) in every job with
  # optimizer offload, async I/O (async_io) with NVMe offload; a minute or more each on a small machine.
  # Build them now with DeepSpeed's own builders: .load() compiles into torch's extension cache, where the
  # runs find them, and needs no reinstall of DeepSpeed. A build that fails is a warning, not a failed setup.
  "$PY" - "${nvme:-0}" <<'PYOPS' || echo "setup: WARNING: DeepSpeed's ops were not built; DeepSpeed runs will build them at start" >&2
import logging, os, sys, time, warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)  # DeepSpeed's accelerator-detection chatter
try:
    from deepspeed.accelerator import get_accelerator
except Exception as e:  # noqa: BLE001
    print(f"setup: WARNING: DeepSpeed cannot be imported ({type(e).__name__}: {e}); no ops built", file=sys.stderr)
    sys.exit(0)
acc = get_accelerator()
ops = [("CPUAdamBuilder", "CPU Adam, for optimizer offload",
        "runs with strategy.offload_optimizer=cpu|nvme will try to build it at start and fail the same way"),
       ("ShareMemCommBuilder", "DeepSpeed's shared-memory collectives on CPU",
        "every DeepSpeed job on CPU will try to build it at start and fail the same way")]
if sys.argv[1] == "1":
    ops.append(("AsyncIOBuilder", "async I/O, for NVMe offload",
                "NVMe offload (strategy=zero3_nvme) is refused before its workers start; install libaio-dev (--nvme)"))
cache = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
print(f"setup: building DeepSpeed's ops for its {acc.device_name()} accelerator into {cache} (minutes the first time)",
      flush=True)
total = time.perf_counter()
for name, what, otherwise in ops:
    builder = acc.create_op_builder(name)
    if builder is None or type(builder).__name__ == "NotImplementedBuilder":
        continue  # no such op for this accelerator (on a GPU, DeepSpeed uses NCCL, not the shared-memory op)
    if not builder.is_compatible(verbose=False):
        print(f"setup: WARNING: DeepSpeed op {builder.NAME} ({what}) cannot be built here: {otherwise}", file=sys.stderr)
        continue
    t0 = time.perf_counter()
    try:
        builder.load(verbose=False)
    except Exception as e:  # noqa: BLE001 - a failed build must not fail the setup
        msg = " ".join(str(e).split())[:300]
        print(f"setup: WARNING: DeepSpeed op {builder.NAME} ({what}) failed to build ({type(e).__name__}: {msg}): "
              f"{otherwise}", file=sys.stderr)
        continue
    print(f"setup: DeepSpeed op {builder.NAME} ({what}) ready in {time.perf_counter() - t0:.1f} s", flush=True)
print(f"setup: DeepSpeed's ops took {time.perf_counter() - total:.1f} s")
PYOPS
}

if [ "${ops_only:-0}" = 1 ]; then
  build_ops
  exit 0
fi

if "$PY" -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found; installing the default (CUDA) torch build"
  "$PY" -m pip install "torch>=2.6"
else
  # No GPU: the CPU build, never the multi-GB CUDA one. A local wheel or mirror is used when
  # pip is configured with one; otherwise PyTorch's own CPU index.
  echo "setup: no GPU; installing the CPU build of torch"
  "$PY" -m pip install "torch==2.13.0+cpu" 2>/dev/null \
    || "$PY" -m pip install "torch==2.13.0" --index-url "${PARALLELKIT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi

"$PY" -m pip install -e ".[$extras]"

if [ "${nvme:-0}" = 1 ]; then
  if ! dpkg -s libaio-dev >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libaio-dev
  fi
  echo "setup: libaio-dev present"
fi
build_ops
# each backend's worker footprint, which the pre-flight fit check adds to its memory prediction on CPU (seconds;
# measured once, cached beside the matmul calibration). Not under CI: the tests measure into a cache of their own.
if [ "${CI:-}" = "true" ]; then
  echo "setup: CI: worker footprints left to the tests' own cache"
else
  echo "setup: measuring each backend's worker footprint for the pre-flight check (a tiny run each; a minute or two)"
  "$PY" -m parallelkit.predict --baseline 2>/dev/null || echo "setup: WARNING: worker footprints not measured; the first run measures them" >&2
fi
echo "setup: done"

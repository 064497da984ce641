#!/usr/bin/env bash
# Install parallelkit and its backends into the current Python environment.
#   bash scripts/setup.sh           # torch (CPU build if there is no GPU), deepspeed, fairscale, hydra, ...
#   bash scripts/setup.sh --nvme    # also Debian's libaio-dev, which DeepSpeed's NVMe offload (ZeRO-Infinity) needs
#   bash scripts/setup.sh --slurm   # also Hydra's submitit launcher, for SLURM sweeps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=test
for arg in "$@"; do
  case "$arg" in
    --nvme) nvme=1 ;;
    --slurm) extras="$extras,slurm" ;;
    *) echo "setup.sh: unknown option $arg (use --nvme, --slurm)" >&2; exit 2 ;;
  esac
done

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found; installing the default (CUDA) torch build"
  "$PY" -m pip install "torch>=2.4"
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
  echo "setup: libaio-dev present; DeepSpeed builds its async_io op on first NVMe use (about two minutes)"
fi
echo "setup: done"

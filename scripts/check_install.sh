#!/usr/bin/env bash
# A non-editable install (pip install ., as a user installs a release) runs the main job from an empty folder:
# the configs ship inside the package. The venv sees this machine's packages (torch, deepspeed, ...), so only
# parallelkit itself is installed, from a wheel built here.
#   bash scripts/check_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv --system-site-packages "$work/venv"
PIP_ROOT_USER_ACTION=ignore "$work/venv/bin/python" -m pip install -q --no-deps . \
  || { echo "check_install: FAILED: pip install . (not editable) did not build or install" >&2; exit 1; }
mkdir "$work/empty"
cd "$work/empty"
where=$("$work/venv/bin/python" -c "import parallelkit, os; print(os.path.dirname(parallelkit.__file__))")
case "$where" in
  "$work/venv/"*) echo "check_install: parallelkit imports from the installed copy ($where)" ;;
  *) echo "check_install: FAILED: parallelkit imports from $where, not from the venv's install" >&2; exit 1 ;;
esac
test -f "$where/conf/config.yaml" || { echo "check_install: FAILED: conf/ is not in the installed package" >&2; exit 1; }
"$work/venv/bin/python" -m parallelkit.run -m strategy=single,ddp model=tiny train.steps=3 train.untimed_steps=1 \
  hydra.sweep.dir="$work/empty/sweep" > "$work/out.txt" 2> "$work/err.txt" \
  || { echo "check_install: FAILED: the sweep from an empty folder:" >&2; tail -20 "$work/err.txt" >&2; exit 1; }
grep -q "report: " "$work/out.txt" || { echo "check_install: FAILED: no report printed" >&2; cat "$work/out.txt" >&2; exit 1; }
echo "check_install: ok: pip install . (not editable), then a 2-job sweep and its report from an empty folder"

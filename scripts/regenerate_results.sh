#!/usr/bin/env bash
# Regenerate results/: every canned experiment (parallelkit/conf/experiment/*.yaml) into results/<name>/,
# then the machine facts and the run table in results/README.md. Run it on a quiet machine:
# the numbers are timings.
#
#   bash scripts/regenerate_results.sh                    # all experiments (~30 min on 2 cores)
#   bash scripts/regenerate_results.sh zero_stages        # only some
#   EXTRA="model=tiny train.steps=4 train.untimed_steps=1" bash scripts/regenerate_results.sh   # a smoke test
#   RESULTS=/tmp/res bash scripts/regenerate_results.sh   # somewhere else
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-results}
read -r -a extra <<< "${EXTRA:-}"
if [ $# -gt 0 ]; then names=("$@"); else names=(compare_all zero_stages memory_vs_model dp_scaling pipelines_3d long_context); fi
mkdir -p "$RESULTS"
failed=()
for name in "${names[@]}"; do
  [ -f "parallelkit/conf/experiment/$name.yaml" ] || { echo "no such experiment: parallelkit/conf/experiment/$name.yaml" >&2; failed+=("$name"); continue; }
  out="$RESULTS/$name"
  commit=$(git describe --always --dirty 2>/dev/null || echo unknown)  # before the old results are deleted
  rm -rf "$out" && mkdir -p "$out"   # no stale summary.json from an earlier run in the report
  cmd=(python -m parallelkit.run -m "experiment=$name" "${extra[@]}" "hydra.sweep.dir=$out")
  echo "== $name: ${cmd[*]}"
  start=$(date +%s)
  started=$(date -u '+%Y-%m-%d %H:%M UTC')
  load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  # hosts differ between days (AVX-512 or not changes speeds 3x): the CPU and its vector units, per experiment
  host="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs) model $(grep -m1 '^model[[:space:]]' /proc/cpuinfo | cut -d: -f2 | xargs); $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | xargs | tr ' ' ',')"
  "${cmd[@]}" 2>&1 | tee "$out/sweep.log"
  rc=${PIPESTATUS[0]}
  # when, at which commit and under what load (1, 5, 15-minute averages before and after): timings from a
  # busy machine are not comparable with a quiet one's
  printf '{"command": "%s", "exit_code": %d, "wall_s": %d, "started": "%s", "commit": "%s", "load_before": "%s", "load_after": "%s", "host": "%s"}\n' \
    "${cmd[*]}" "$rc" "$(( $(date +%s) - start ))" "$started" "$commit" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" "$host" > "$out/command.json"
  [ "$rc" -eq 0 ] && [ -f "$out/comparison.md" ] || failed+=("$name")
done

# The machine, the date and the run table, between the markers of results/README.md.
python - "$RESULTS" <<'EOF'
import json, os, platform, re, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from parallelkit.measure.host import machine, versions

root = Path(sys.argv[1])
m = machine()
lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if os.path.exists("/usr/bin/lscpu") else ""
field = lambda k: next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith(k + ":")), None)
flags = [f for f in (field("Flags") or "").split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
cpu = m["cpu"] + (f" (family {field('CPU family')}, model {field('Model')}" if field("CPU family") else "")
cpu += (f"; {', '.join(flags)}" if flags else "") + (f"; {field('Hypervisor vendor')} guest" if field("Hypervisor vendor") else "") + (")" if field("CPU family") else "")
try:
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["none"]
except Exception:  # noqa: BLE001
    gpus = ["unknown"]
git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
v = versions()
for mod in ("pandas", "matplotlib"):
    v[mod] = __import__(mod).__version__
facts = {
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git or None, "cpu": cpu,
    "cores": m["cores"], "memory_gib": round((m["memory_bytes"] or 0) / 2**30, 1), "gpus": gpus,
    "os": " ".join(platform.freedesktop_os_release().get("PRETTY_NAME", "").split()) if hasattr(platform, "freedesktop_os_release") else platform.platform(),
    "kernel": platform.release(), "versions": v,
}
(root / "machine.json").write_text(json.dumps(facts, indent=1) + "\n")
machine_md = "\n".join([
    f"- last regeneration: {facts['date']}, commit `{facts['commit']}`; each experiment's own date, commit, host and load are in the table below (the machine here is the last regeneration's)",
    f"- CPU: {facts['cpu']}, {facts['cores']} cores; memory {facts['memory_gib']} GiB; GPU: {', '.join(gpus)}",
    f"- OS: {facts['os']} (kernel {facts['kernel']})",
    "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
])

rows = ["| experiment | command | ran (UTC), commit, host | load before -> after | runs: ok / all | not ok | wall time | report |",
        "|---|---|---|---|---|---|---|---|"]
for d in sorted(p for p in root.iterdir() if (p / "command.json").exists()):
    c = json.loads((d / "command.json").read_text())
    cmd = re.sub(r" hydra\.sweep\.dir=\S+", "", c["command"])
    try:
        t = pd.read_csv(d / "comparison.csv")
        counts = t["status"].value_counts()
        bad = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "ok") or "-"
        runs = f"{counts.get('ok', 0)} / {len(t)}"
    except (OSError, KeyError, pd.errors.EmptyDataError):
        runs, bad = "no report", f"exit code {c['exit_code']}"
    links = " · ".join(f"[{f.split('.')[-1] if f.startswith('comparison') else f[:-4]}]({d.name}/{f})"
                       for f in ("comparison.md", "comparison.html", "comparison.csv", "memory.png", "throughput.png",
                                 "loss.png", "memory_vs_model.png", "scaling.png") if (d / f).exists())
    when = f"{c.get('started', '?')}, `{c.get('commit', '?')}`, {c.get('host', 'host not recorded')}"
    load = f"{c.get('load_before', '?')} -> {c.get('load_after', '?')}"
    rows.append(f"| {d.name} | `{cmd}` | {when} | {load} | {runs} | {bad} | {c['wall_s'] // 60} min {c['wall_s'] % 60} s | {links} |")

readme = root / "README.md"
text = readme.read_text() if readme.exists() else "<!-- machine:begin -->\n<!-- machine:end -->\n\n<!-- runs:begin -->\n<!-- runs:end -->\n"
for key, body in (("machine", machine_md), ("runs", "\n".join(rows))):
    text = re.sub(rf"<!-- {key}:begin -->.*?<!-- {key}:end -->", lambda _: f"<!-- {key}:begin -->\n{body}\n<!-- {key}:end -->", text, flags=re.S)
readme.write_text(text)
print(f"wrote {readme} and {root / 'machine.json'}")
EOF

if [ ${#failed[@]} -gt 0 ]; then
  echo "experiments that did not finish with a report: ${failed[*]}" >&2
  exit 1
fi

"""``python -m parallelkit.report DIR``: every summary.json below DIR -> one comparison table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .results import read_json


def load(root: Path) -> pd.DataFrame:
    rows = []
    for p in sorted(Path(root).rglob("summary.json"), key=lambda p: str(p)):
        try:
            s = read_json(p)
        except (OSError, ValueError) as e:
            s = {"status": "failed", "error": f"unreadable summary.json: {e}"}
        s["run_dir"] = str(p.parent)
        rows.append(s)
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> pd.DataFrame:
    def mx(v):
        return max(v) if isinstance(v, list) and v else None

    out = pd.DataFrame({
        "label": df.get("label"), "model": df.get("model"), "params": df.get("params"),
        "world/dp/tp/pp": [f"{r.get('world_size')}/{r.get('dp')}/{r.get('tp')}/{r.get('pp')}" for r in df.to_dict("records")],
        "precision": df.get("precision"), "tokens/s": df.get("tokens_per_s"),
        "step ms": df.get("step_time_s", pd.Series(dtype=float)) * 1e3, "TFLOP/s": df.get("tflops"), "MFU": df.get("mfu"),
        "peak mem MiB/rank": [None if mx(v) is None else mx(v) / 2**20 for v in df.get("peak_mem_bytes", [])],
        "state MiB/rank": [None if mx(v) is None else mx(v) / 2**20 for v in df.get("model_state_bytes", [])],
        "comm MiB/step": [None if mx(v) is None else mx(v) / 2**20 for v in df.get("comm_bytes_per_step", [])],
        "final loss": df.get("final_loss"), "status": df.get("status"), "error": df.get("error"),
    })
    return out


def fmt(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    for col, f in (("tokens/s", "{:,.0f}"), ("step ms", "{:,.1f}"), ("TFLOP/s", "{:.4f}"), ("MFU", "{:.1%}"),
                   ("peak mem MiB/rank", "{:,.0f}"), ("state MiB/rank", "{:,.2f}"), ("comm MiB/step", "{:,.2f}"),
                   ("final loss", "{:.4f}"), ("params", "{:,.0f}")):
        if col in t:
            t[col] = [f.format(v) if v is not None and v == v else "" for v in t[col]]
    return t.fillna("")


def write_report(root: Path, echo: bool = True) -> Path | None:
    root = Path(root)
    df = load(root)
    if df.empty:
        print(f"parallelkit.report: no summary.json below {root}", file=sys.stderr)
        return None
    t = table(df)
    t.to_csv(root / "comparison.csv", index=False)
    shown = fmt(t)
    md = shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False)
    (root / "comparison.md").write_text(f"# Comparison: {root}\n\n{md}\n")
    if echo:
        print(shown.drop(columns=["error"]).to_string(index=False))
        for r in t.to_dict("records"):
            if r["status"] != "ok":
                print(f"  {r['label']}: {r['status']}: {r['error']}")
        print(f"\nreport: {root / 'comparison.md'}")
    return root / "comparison.md"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra not installed: the CLI report still works
    Callback = object


class SweepReport(Callback):
    """Hydra callback: the comparison report of the whole sweep when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        print()
        write_report(Path(config.hydra.sweep.dir))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.report", description=__doc__)
    ap.add_argument("dir", type=Path, help="a run or sweep folder (searched recursively for summary.json)")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        ap.error(f"{args.dir} is not a folder")
    if write_report(args.dir) is None:
        sys.exit(1)


if __name__ == "__main__":
    main()

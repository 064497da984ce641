"""Is a run's timing trustworthy? Step-time spread, peak drift, MFU that cannot pass 100%.

On a shared machine the same run took 958 ms/step one time and 17.6 s the next, and the
report said nothing. Two signs of another load, recorded in every summary:

- spread = p90 / median of the timed step times. Contention comes and goes, so some
  steps take much longer than the median. A quiet 2-rank tiny run on 2 cores shows
  1.1-1.3 (gloo's all-reduce jitters); above SPREAD_LIMIT = 1.5 a tenth of the steps took
  half as long again as the median, which a quiet machine does not do. With under ~10 timed
  steps p90 is close to the slowest step, so one hiccup can flag a short run.
- drift = the matmul rate after the run / the calibrated peak - 1. Steady contention
  (a busy loop for the whole run) slows every step alike and leaves the spread small,
  but it takes its share of the matmul check after the run. A quiet re-check lands
  within ~15% of the calibration (best of 3 short trials vs best of 5 longer ones);
  beyond DRIFT_LIMIT = 25% either way the machine was not the one calibrated: slower
  now (busy now), or faster now (the calibration met a busy moment).

A row with either gets ``noisy: true`` and a ``noise_reason`` the report shows.
"""
from __future__ import annotations

import sys

import torch

import parallelkit.measure.calibrate as calibrate

SPREAD_LIMIT = 1.5  # p90 / median of step times
DRIFT_LIMIT = 0.25  # |after / before - 1| of the matmul peak


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def noise_fields(step_times: list[float], peak_before: float | None, peak_after: float | None) -> dict:
    """Summary fields: the step-time distribution, the peak's drift, and whether the run was noisy."""
    out: dict = {"step_time_median_s": None, "step_time_min_s": None, "step_time_max_s": None,
                 "step_time_p10_s": None, "step_time_p90_s": None, "step_time_spread": None,
                 "peak_before_tflops": peak_before, "peak_after_tflops": peak_after, "peak_drift": None,
                 "noisy": False, "noise_reason": None}
    reasons = []
    if step_times:
        med = quantile(step_times, 0.5)
        out.update(step_time_median_s=med, step_time_min_s=min(step_times), step_time_max_s=max(step_times),
                   step_time_p10_s=quantile(step_times, 0.1), step_time_p90_s=quantile(step_times, 0.9))
        out["step_time_spread"] = spread = out["step_time_p90_s"] / med if med > 0 else None
        if spread is not None and spread > SPREAD_LIMIT:
            reasons.append(f"machine busy: step times varied {spread:.2f}x (p90/median, limit {SPREAD_LIMIT}x)")
    if peak_before and peak_after:
        out["peak_drift"] = drift = peak_after / peak_before - 1
        if abs(drift) > DRIFT_LIMIT:
            where = ("below its calibration after the run" if drift < 0
                     else "above its calibration after the run: the calibration met a busy moment")
            reasons.append(f"machine busy: matmul rate {abs(drift):.0%} {where} (limit {DRIFT_LIMIT:.0%})")
    if reasons:
        out.update(noisy=True, noise_reason="; ".join(reasons))
    return out


def mfu(achieved_tflops: float | None, peak: float | None) -> dict:
    """MFU against the peak as calibrated (or from the data sheet). Above 1 it is reported as it is, with
    ``mfu_error`` saying the peak (or the FLOP count) is wrong: clipping it at 1 would hide exactly that."""
    if not peak or achieved_tflops is None:
        return {"mfu": None, "peak_tflops": peak or None, "mfu_error": None}
    value = achieved_tflops / peak
    error = None
    if value > 1:
        error = (f"MFU {value:.2f} > 1: the run achieved {achieved_tflops:.4g} TFLOP/s against a peak of {peak:.4g}; "
                 f"the peak is wrong (a calibration taken on a busy moment, or the wrong data-sheet entry: set "
                 f"peak_tflops) or the FLOP count is")
    return {"mfu": value, "peak_tflops": peak, "mfu_error": error}


class RunProbe:
    """What the loop measures besides its steps: the peak before them, the machine after.

    Every rank makes one, so on CPU the calibration and the re-check run on all ranks at
    once, as the steps do. An explicit ``peak_tflops`` skips both (no drift then).
    """

    def __init__(self, cfg, device: torch.device, precision: str, verbose: bool):
        self.device, self.precision, self.verbose = device, precision, verbose
        given = cfg.get("peak_tflops")
        self.before = None
        if given:
            self.peak, self.source = float(given), "config: peak_tflops"
        else:
            # the rate the drift is measured from. CUDA: a short matmul check now (the data sheet is no measurement to
            # drift from); CPU: the calibrated peak itself
            check = calibrate.recheck(device, precision) if device.type == "cuda" else None
            self.peak, self.source = calibrate.device_peak(device, precision)
            self.before = check or self.peak
        self.warning = calibrate.precision_warning(device, precision)
        if self.warning and verbose:
            print(f"parallelkit: warning: {self.warning}", file=sys.stderr, flush=True)

    def finish(self, step_times: list[float], achieved_tflops: float | None, peak: float | None) -> dict:
        """Fields to merge into summary.json (``peak`` is the ranks' mean of ``self.peak``)."""
        after = calibrate.recheck(self.device, self.precision) if self.before else None
        out = {"step_times_s": list(step_times), "host": calibrate.host_facts(self.device),
               "precision_warning": self.warning, "peak_source": self.source,
               **noise_fields(step_times, self.before, after), **mfu(achieved_tflops, peak)}
        if out["mfu_error"] and self.verbose:
            print(f"parallelkit: {out['mfu_error']}", file=sys.stderr, flush=True)
        if out["noisy"] and self.verbose:
            print(f"parallelkit: noisy run: {out['noise_reason']}", file=sys.stderr, flush=True)
        return out

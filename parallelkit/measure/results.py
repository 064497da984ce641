"""summary.json: the run's typed result record, and the facts of the machine and versions it ran on."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from parallelkit.measure.host import machine, versions


@dataclass
class Summary:
    """summary.json: the run's result, one typed record (docs/results.md lists the fields users rely on)."""

    status: str = "failed"  # ok | oom | failed | timeout | killed | interrupted | skipped
    error: str | None = None
    strategy: str | None = None
    label: str | None = None
    model: str | None = None
    params: int | None = None
    world_size: int | None = None
    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    processes: int | None = None
    precision: str | None = None
    device: str | None = None
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    global_batch: int | None = None
    seq_len: int | None = None
    steps: int | None = None
    timed_steps: int = 0
    tokens_per_step: int | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)  # every timed step, for the spread
    tflops: float | None = None
    mfu: float | None = None
    peak_tflops: float | None = None
    peak_mem_bytes: list[int] | None = None
    peak_mem_kind: str | None = None
    cpu_malloc: str | None = None  # glibc's mmap threshold in the workers (train.cpu_mmap_threshold): what RSS keeps
    peak_reserved_bytes: list[int] | None = None
    model_state_bytes: list[int] | None = None
    model_state_breakdown: list[dict] | None = None
    comm_bytes_per_step: list[int] | None = None
    comm_by_kind: list[dict] | None = None  # per rank: {kind: {"calls": n, "bytes": b}} on the probe step
    measured_on: str | None = None  # which step counted communication (the probe step, or every timed step)
    losses: list[float] = field(default_factory=list)
    final_loss: float | None = None
    strategy_facts: dict | None = None
    one_process: bool = False
    reference: int | None = None  # this strategy is a loss reference (lower: preferred); see Strategy.reference
    # how far the timing can be trusted (noise.py, calibrate.py)
    step_time_median_s: float | None = None
    step_time_min_s: float | None = None
    step_time_max_s: float | None = None
    step_time_p10_s: float | None = None
    step_time_p90_s: float | None = None
    step_time_spread: float | None = None  # p90 / median of the timed steps
    peak_before_tflops: float | None = None  # the calibrated peak before the run
    peak_after_tflops: float | None = None  # a quick re-check after it
    peak_drift: float | None = None  # after / before - 1
    noisy: bool | None = None
    noise_reason: str | None = None  # e.g. "machine busy: step times varied 3.1x"
    peak_source: str | None = None
    peak_raised_from: float | None = None  # (older summaries) the peak was raised to the achieved rate
    mfu_error: str | None = None  # MFU above 1: the peak (or the FLOP count) is wrong, said in one line
    first_step: int = 0  # the step ``losses`` starts at (a resumed run: the checkpoint's step)
    step_breakdown: list[dict | None] | None = None  # per rank: the profiled untimed step's parts (measure/breakdown.py)
    step_why: str | None = None  # the largest parts of the step, on the timed median's scale
    live_peak_mem_bytes: list[int] | None = None  # CPU, per rank: malloc's bytes in use at the probe step's high point
    save_peak_mem_bytes: list[int] | None = None  # per rank: the peak while a checkpoint was saved (apart from training)
    precision_warning: str | None = None
    host: dict = field(default_factory=dict)  # CPU model and capabilities (avx512_bf16, ...), GPU
    repeat: int | None = None  # the repeat index in a sweep with repeats=N
    # predictions made before the run (predict.py), beside the measured fields above
    predicted_model_state_bytes: int | None = None  # the busiest rank
    predicted_peak_mem_bytes: int | None = None  # the busiest rank, in the unit peak_mem_bytes measures
    predicted_comm_bytes_per_step: int | None = None  # payload per rank, as comm_bytes_per_step counts it
    predicted_comm_by_kind: dict | None = None  # {kind: bytes per step}
    predicted_step_time_s: float | None = None  # projection.py: the sum of its parts (parts_s)
    predicted_largest_model: dict | None = None  # the largest GPT preset this setup is predicted to fit (estimator)
    prediction: dict | None = None  # how: the parts, the assumptions, the calibration used
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def update(self, **values: Any) -> "Summary":
        for k, v in values.items():
            if k not in self.__dataclass_fields__:
                raise AttributeError(f"Summary has no field {k!r}")
            setattr(self, k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def base_summary(plan) -> Summary:
    """The fields a plan knows before training; a failed run's summary is this plus status and error."""
    from parallelkit.measure.calibrate import host_facts

    cfg, cls, opts, lay = plan.cfg, plan.cls, plan.opts, plan.layout
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * lay.data_ranks
    return Summary(
        strategy=cfg.strategy.name, label=cls.label(cfg, opts), model=cfg.model.name,
        params=plan.model.num_params(), world_size=lay.world, dp=lay.dp, tp=lay.tp, pp=lay.pp,
        processes=lay.processes, precision=t.precision, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
        global_batch=global_batch, seq_len=cfg.model.seq_len, steps=t.steps, tokens_per_step=global_batch * cfg.model.seq_len,
        one_process=cls.one_process, reference=cls.reference, versions=versions(), machine=machine(), host=host_facts(), repeat=cfg.get("repeat"))


def failed_summary(cfg, error: str, plan=None) -> dict:
    """A summary for a run that never started: as many known fields as the plan (or the config) gives."""
    from omegaconf import OmegaConf

    try:
        if plan is None:
            from parallelkit.config.checks import default_world_size
            from parallelkit.config.plan import RunPlan

            cfg = OmegaConf.merge(cfg, {"world_size": cfg.get("world_size") or default_world_size()})
            plan = RunPlan.of(cfg)
        s = base_summary(plan).to_dict()
    except Exception:  # noqa: BLE001 - the config itself may be what is broken
        s = {"strategy": OmegaConf.select(cfg, "strategy.name"), "label": OmegaConf.select(cfg, "strategy.name"),
             "model": OmegaConf.select(cfg, "model.name"), "losses": []}
    s.update(status="failed", error=error)
    return s


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()
    return text[:400]


def result_line(s: dict, where) -> str:
    """The line a run prints when it ends (``where``: its folder)."""
    if s["status"] != "ok":
        return f"{s.get('label')}: {s['status']}: {s.get('error')}  ({where})"
    mem = max(s["peak_mem_bytes"]) / 2**20
    mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""
    return (f"{s['label']}: ok, {s['tokens_per_s']:,.0f} tokens/s{mfu}, step {s['step_time_s'] * 1e3:.1f} ms, "
            f"peak mem {mem:,.0f} MiB/rank, final loss {s['final_loss']:.4f}  ({where})")

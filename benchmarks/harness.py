"""Side-by-side timing on a noisy machine, and the records every benchmark returns.

Every timing in these benchmarks is a ratio of two candidates run in the same process:
``compare`` warms each candidate up, calibrates how many calls make one short measurement,
then runs many rounds; in each round every candidate is measured once, in a fresh random
order. The ratio of two candidates is taken *within* each round (so slow drifts of the
machine's load cancel) and summarised by its median over rounds, with the interquartile range
and a distribution-free 95% confidence interval of the median.

On a CPU the clock is the process's CPU time (``time.process_time``) with one intra-op
thread unless told otherwise: it leaves out the time the process waits while other jobs run
on a shared machine. Wall-clock ratios are measured alongside and reported too. On CUDA the
clock is wall time between ``torch.cuda.synchronize()`` calls.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Config:
    """What a run measures: sizes and repetitions shrink with ``quick``."""

    quick: bool = False
    device: str = "cpu"
    threads: int = 1
    seed: int = 0

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@dataclasses.dataclass
class Ratio:
    """Per-round ratios of candidate ``a`` to candidate ``b`` and their summary."""

    a: str
    b: str
    values: list[float]
    wall_values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall_values)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.values, n=4) if len(self.values) > 1 else self.values * 3
        return q[0], q[2]

    @property
    def ci95(self) -> tuple[float, float]:
        """Distribution-free 95% interval of the median (binomial order statistics)."""
        v = sorted(self.values)
        n = len(v)
        half = 1.96 * math.sqrt(n) / 2
        lo = max(0, int(math.floor(n / 2 - half)) - 1)
        hi = min(n - 1, int(math.ceil(n / 2 + half)))
        return v[lo], v[hi]

    def fmt(self, digits: int = 3) -> str:
        lo, hi = self.iqr
        return f"{self.median:.{digits}f} (IQR {lo:.{digits}f}–{hi:.{digits}f})"


@dataclasses.dataclass
class Comparison:
    """Seconds per call of each candidate, one entry per round."""

    names: list[str]
    seconds: dict[str, list[float]]
    wall: dict[str, list[float]]
    calls: dict[str, int]
    rounds: int
    clock: str

    def ratio(self, a: str, b: str) -> Ratio:
        return Ratio(
            a,
            b,
            [x / y for x, y in zip(self.seconds[a], self.seconds[b])],
            [x / y for x, y in zip(self.wall[a], self.wall[b])],
        )

    def median_s(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def describe(self) -> str:
        calls = ", ".join(f"{n}: {self.calls[n]}" for n in self.names)
        return (
            f"{self.rounds} interleaved rounds, clock: {self.clock}; calls per measurement "
            f"({calls})"
        )


def compare(
    candidates: dict[str, Callable[[], Any]],
    cfg: Config,
    *,
    rounds: int,
    target_s: float = 0.01,
    warmup: int = 3,
) -> Comparison:
    """Times ``candidates`` side by side; see the module docstring for the protocol."""
    names = list(candidates)
    on_cuda = cfg.device.startswith("cuda")
    clock = time.perf_counter if on_cuda else time.process_time
    rng = random.Random(cfg.seed)

    def measure(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
        cfg.sync()
        w0, c0 = time.perf_counter(), clock()
        for _ in range(calls):
            fn()
        cfg.sync()
        return (clock() - c0) / calls, (time.perf_counter() - w0) / calls

    for _ in range(warmup):
        for n in names:
            candidates[n]()
    calls = {}
    for n in names:
        one = min(measure(candidates[n], 1)[1] for _ in range(2))
        calls[n] = max(1, int(round(target_s / max(one, 1e-7))))
    seconds: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                c, w = measure(candidates[n], calls[n])
                seconds[n].append(max(c, 1e-9))
                wall[n].append(max(w, 1e-9))
    finally:
        if was_enabled:
            gc.enable()
    clock_name = "wall time (CUDA synchronised)" if on_cuda else "process CPU time"
    return Comparison(names, seconds, wall, calls, rounds, clock_name)


@dataclasses.dataclass
class Bar:
    """One requirement: a measured value against a threshold."""

    item: str
    what: str
    value: float
    threshold: float
    op: str  # "<=" or ">="
    shown: str  # the value as printed, with its spread
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold


@dataclasses.dataclass
class Section:
    """A benchmark's contribution to RESULTS.md."""

    key: str
    title: str
    body: str
    bars: list[Bar] = dataclasses.field(default_factory=list)
    headline: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(cfg: Config) -> dict[str, str]:
    """The facts a reader needs to place the numbers."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores visible",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": f"torch.set_num_threads({cfg.threads}); torch.get_num_threads() = "
        f"{torch.get_num_threads()}",
        "device": cfg.device,
    }
    try:
        with open("/proc/loadavg") as f:
            info["load"] = "load average at start: " + " ".join(f.read().split()[:3])
    except OSError:
        pass
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(cfg.dev)
    try:
        import dice_mc  # noqa: F401
        from importlib.metadata import version

        info["dice-mc"] = version("dice-mc")
    except Exception:  # noqa: BLE001
        info["dice-mc"] = "not installed"
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "dicefn", "benchmarks/*.py")
    info["code"] = f"commit {commit}" + (" with uncommitted changes" if dirty else "") if commit else "unknown"
    return info

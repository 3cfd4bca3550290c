"""Figures over repeated runs: median, spread, a confidence interval, and ratios of paired runs.

`podipc bench --repeat N` runs every cell N times, the subjects of one mode and size taking
turns (A B A B ...), so run k of a channel and run k of its baseline ran side by side. A
ratio is computed for each such pair and then summarised, never from two medians taken
apart: what a pair shares (the machine's load at that moment) cancels out.

The confidence interval is netperf's (`-I level,width`): Student's t interval of the mean
at `level` percent; `--confidence` keeps adding runs until its width, as a percentage of
the mean, is at most `width` for every key figure and ratio of a mode and size (or the
most runs allowed were made). Medians are what the report and the targets use; the mean
and its interval say how settled they are.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from podipc.bench.stats import percentile

DEFAULT_CONFIDENCE_LEVEL = 99.0
"""netperf's default level (percent)."""
DEFAULT_CONFIDENCE_WIDTH = 10.0
"""netperf's default width of the interval, in percent of the mean."""
DEFAULT_MAX_REPEAT = 10
"""Most runs of a cell while --confidence is not met yet (netperf's `-i 10,3` in its example scripts)."""
MIN_CONFIDENCE_RUNS = 3
"""Runs of each cell before --confidence judges the interval (the 3 of `-i 10,3`)."""
MOST_REPEATS = 30
"""The largest --repeat / --max-repeat (netperf's own cap on iterations)."""
APIS = ("sync", "async")
"""--api: the sync endpoints only, or their podipc.aio twins beside them."""
_BETA_ITERATIONS = 300
_BETA_EPSILON = 3e-16
_QUANTILE_STEPS = 200


# --- Student's t ------------------------------------------------------------------------


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, _BETA_ITERATIONS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < _BETA_EPSILON:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, freedom: int) -> float:
    """P(T <= t) for Student's t with `freedom` degrees of freedom."""
    tail = 0.5 * regularized_beta(freedom / 2.0, 0.5, freedom / (freedom + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(probability: float, freedom: int) -> float:
    """The t with P(T <= t) = probability (0.5 < probability < 1), found by bisection on the CDF."""
    if not 0.5 < probability < 1.0 or freedom < 1:
        raise ValueError(f"need 0.5 < probability < 1 and freedom >= 1, got {probability}, {freedom}")
    low, high = 0.0, 1.0
    while student_t_cdf(high, freedom) < probability:
        high *= 2.0
    for _ in range(_QUANTILE_STEPS):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, freedom) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2.0


# --- spread of one figure ----------------------------------------------------------------


@dataclass
class Spread:
    """How one figure varied over the runs of a cell: median, range, mean, and the mean's t interval.

    The interval's level is the report's (plan.confidence, else DEFAULT_CONFIDENCE_LEVEL).
    """

    n: int
    median: float
    min: float
    max: float
    mean: float
    stdev: float | None
    """Sample standard deviation (None for one run)."""
    ci_low: float | None
    ci_high: float | None
    ci_width_percent: float | None
    """(ci_high - ci_low) as a percentage of the mean: netperf's interval width."""

    @classmethod
    def of(cls, values: Sequence[float], level: float = DEFAULT_CONFIDENCE_LEVEL) -> Spread:
        """The spread of `values` (at least one), with the mean's `level` % confidence interval from two on."""
        if not values:
            raise ValueError("no values")
        ordered = sorted(float(value) for value in values)
        mean = statistics.fmean(ordered)
        stdev = low = high = width = None
        if len(ordered) >= 2:
            stdev = statistics.stdev(ordered)
            half = student_t_quantile(0.5 + level / 200.0, len(ordered) - 1) * stdev / math.sqrt(len(ordered))
            low, high = mean - half, mean + half
            width = 200.0 * half / abs(mean) if mean else (0.0 if half == 0 else math.inf)
        return cls(
            n=len(ordered),
            median=_round(percentile(ordered, 50.0), SPREAD_DIGITS),
            min=_round(ordered[0], SPREAD_DIGITS),
            max=_round(ordered[-1], SPREAD_DIGITS),
            mean=_round(mean, SPREAD_DIGITS),
            stdev=None if stdev is None else _round(stdev, SPREAD_DIGITS),
            ci_low=None if low is None else _round(low, SPREAD_DIGITS),
            ci_high=None if high is None else _round(high, SPREAD_DIGITS),
            ci_width_percent=None if width is None else round(width, 3),
        )

    def settled(self, width_percent: float) -> bool:
        """True when the confidence interval is at most `width_percent` of the mean wide."""
        return self.ci_width_percent is not None and self.ci_width_percent <= width_percent

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping."""
        return asdict(self)


def _round(value: float, digits: int = 6) -> float:
    """`digits` significant digits: enough for any figure here, short in the JSON."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


SPREAD_DIGITS = 5
"""Significant digits of a spread's statistics (a run-to-run spread is never known better)."""


# --- figures of runs -----------------------------------------------------------------------

RUN_FIGURES = {
    "latency": ("round_trips", "lost", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "min_us", "mean_us"),
    "throughput": ("sent", "received", "lost", "reordered", "duplicated", "seconds", "messages_per_second"),
    "cpu": ("client_core_fraction", "server_core_fraction"),
    "idle": ("core_fraction",),
    "ticker": ("ticks", "lag_p50_ms", "lag_p99_ms", "lag_max_ms"),
}
"""What the report keeps of each run, by figures object (a record's own objects keep every field, as medians)."""
RUN_FIELDS = ("run", "sequence", "status", "reason", "elapsed_seconds")


def figure_of(run: Mapping[str, Any], figure: str) -> float | None:
    """The value of `figure` ('latency.p50_us', 'throughput.messages_per_second'...) in an ok run, else None."""
    if run.get("status") != "ok":
        return None
    group, _, key = figure.partition(".")
    part = run.get(group)
    if not isinstance(part, Mapping):
        return None
    value = part.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def spread_of(runs: Iterable[Mapping[str, Any]], figure: str, level: float) -> Spread | None:
    """The spread of `figure` over the ok runs that have it (None when none has)."""
    values = [value for value in (figure_of(run, figure) for run in runs) if value is not None]
    return Spread.of(values, level) if values else None


def run_columns(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The runs of a cell as columns: 'run', 'status'... and each kept figure ('latency.p50_us': one value per run)."""
    columns: dict[str, list[Any]] = {field: [run[field] for run in runs] for field in RUN_FIELDS}
    for group, keys in RUN_FIGURES.items():
        if any(run.get(group) for run in runs):
            for key in keys:
                columns[f"{group}.{key}"] = [(run.get(group) or {}).get(key) for run in runs]
    return columns


def figures_by_run(columns: Mapping[str, Sequence[Any]], figure: str) -> dict[int, float]:
    """{run number: value of `figure`} over the ok runs of a record's run columns that have it."""
    values = columns.get(figure) or ()
    return {
        run: float(value)
        for run, status, value in zip(columns.get("run", ()), columns.get("status", ()), values, strict=False)
        if status == "ok" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def paired_ratios(
    columns: Mapping[str, Sequence[Any]],
    reference_columns: Mapping[str, Sequence[Any]],
    figure: str,
    inverse: bool = False,
) -> list[float]:
    """figure(run k) / figure(reference run k) for every k where both runs are ok (reference / subject if inverse)."""
    references = figures_by_run(reference_columns, figure)
    ratios = []
    for run, value in figures_by_run(columns, figure).items():
        base = references.get(run)
        if base is None:
            continue
        numerator, denominator = (base, value) if inverse else (value, base)
        if denominator > 0:
            ratios.append(numerator / denominator)
    return ratios


COUNT_FIELDS = frozenset({"round_trips", "lost", "sent", "received", "reordered", "duplicated", "ticks"})
"""Counts: a repeated cell reports their totals over its runs (so received + lost still equals sent)."""


def combine(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One figures object from the same object of several runs: counts summed, every other number its median."""
    combined: dict[str, Any] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if any(value is None for value in values):
            combined[key] = None
        elif all(isinstance(value, bool) for value in values):
            combined[key] = all(values)
        elif all(isinstance(value, int) for value in values):
            combined[key] = sum(values) if key in COUNT_FIELDS else round(statistics.median(values))
        elif all(isinstance(value, (int, float)) for value in values):
            combined[key] = sum(values) if key in COUNT_FIELDS else _round(statistics.median(values))
        else:
            combined[key] = values[0]
    return combined

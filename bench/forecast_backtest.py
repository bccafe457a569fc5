"""Forecast backtest: the shipped forecaster against the baselines a user would otherwise use.

    python -m bench.forecast_backtest                  # all three parts, Markdown on stdout
    python -m bench.forecast_backtest --json out.json  # the figures as JSON too
    python -m bench.forecast_backtest --data DIR       # data elsewhere than ../shared/data

Rolling origin: at each origin every method sees only the data before it, and is scored on the
hourly means of the next 1, 6 or 24 hours (the error averaged over those hours). Accuracy is
MASE: the mean absolute error divided by the in-sample mean absolute error of the naive
forecast on the same training data (seasonal naive, 24 h, on the multi-day data; last value
within the day), so series of any scale can be pooled; below 1 is better than that in-sample
naive. The interval coverage is the share of held-back hours inside the 80% interval.

- NAB (5-minute CPU utilization, ~14 days each): hourly means; 17 origins, every 6 hours from
  five days to one day before the end, so each has a whole held-back day after it.
- Alibaba GenAI pods (one day, 57 s steps): hourly means, because the shipped forecaster is
  hourly (it is what the service asks Prometheus for); origins every hour with at least 6 hours
  of the pod's history. No 24 h horizon (one day of data) and no daily season to be naive with.
- Speed: ``fit_many`` on 500 synthetic 14-day hourly series, horizon 24 h, median of 3 runs,
  in fresh processes with ``OPENBLAS_NUM_THREADS`` unset and set to 1.

Prometheus ``predict_linear`` is fitted on the raw samples, as Prometheus would fit it, and its
line is read at each target hour's midpoint (the line's mean over the hour), which is the most
favourable reading for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analytics.forecast import (
    fit_forecast,
    fit_many,
    hourly,
    predict_linear,
    seasonal_naive,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
HOUR = pd.Timedelta(hours=1)
PERCENT = (0.0, 100.0)
#: predict_linear lookbacks: the one kubernetes-mixin and node-mixin alerts use, and the horizon.
LINEAR_6H = "predict_linear [6h]"
LINEAR_H = "predict_linear [h]"
OURS = "forecaster"


@dataclass
class Scores:
    """Per-series MASE lists and interval hits for one method at one horizon."""

    mase: dict[str, list[float]] = field(default_factory=dict)
    abs_errors: list[float] = field(default_factory=list)
    inside: list[bool] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)


def load_nab(data: Path) -> dict[str, pd.Series]:
    """The NAB CloudWatch CPU series (percent, 5-minute), keyed by file stem."""
    out = {}
    for path in sorted((data / "nab-cloud-utilization").glob("*.csv")):
        frame = pd.read_csv(path, parse_dates=["timestamp"])
        out[path.stem] = pd.Series(
            frame["value"].to_numpy(float), index=pd.DatetimeIndex(frame["timestamp"], tz="UTC")
        )
    if not out:
        sys.exit(f"no NAB data under {data}")
    return out


def load_alibaba(data: Path) -> dict[str, pd.Series]:
    """GPU duty cycle (percent) per pod, indexed by the anonymised sample time."""
    path = data / "alibaba-genai-2026" / "pod_gpu_util.csv.gz"
    frame = pd.read_csv(path, usecols=["series_id", "ts_anon", "gpu_util_pct"])
    frame["time"] = pd.to_datetime(frame["ts_anon"], unit="s", utc=True)
    return {
        str(pod): group.set_index("time")["gpu_util_pct"].sort_index().astype(float)
        for pod, group in frame.groupby("series_id")
    }


def line_at_midpoints(raw: pd.Series, origin: pd.Timestamp, horizon: int, lookback: int) -> Any:
    """predict_linear's line over the raw samples before ``origin``, read at the midpoint of
    each of the next ``horizon`` hours (the line is exact at whole hours after its last sample,
    so any point on it follows from two of them)."""
    before = raw[raw.index < origin]
    points = predict_linear(before, 2, lookback)
    hours_ahead = (origin - before.index[-1]) / HOUR + np.arange(horizon) + 0.5
    return points[0] + (hours_ahead - 1.0) * (points[1] - points[0])


def backtest(
    raw: dict[str, pd.Series],
    horizons: list[int],
    origins_of: Callable[[pd.Series], list[pd.Timestamp]],
    naive_season: int,
    naive_name: str,
) -> dict[int, dict[str, Scores]]:
    """Rolling-origin scores for every method at every horizon."""
    methods = [OURS, naive_name, LINEAR_6H, LINEAR_H]
    scores = {h: {m: Scores() for m in methods} for h in horizons}
    for name, samples in raw.items():
        series = complete_hours(samples)
        for origin in origins_of(series):
            train = series[series.index < origin]
            scale = _naive_scale(train, naive_season)
            forecast = fit_forecast(train, max(horizons), bounds=PERCENT)
            naive = seasonal_naive(train, max(horizons), naive_season)
            for h in horizons:
                actual = series.reindex(pd.date_range(origin, periods=h, freq=HOUR)).to_numpy()
                if np.isnan(actual).any():
                    continue
                predictions = {
                    OURS: forecast.mean[:h],
                    naive_name: naive[:h],
                    LINEAR_6H: line_at_midpoints(samples, origin, h, 6),
                    LINEAR_H: line_at_midpoints(samples, origin, h, h),
                }
                for method, predicted in predictions.items():
                    entry = scores[h][method]
                    error = np.abs(actual - predicted)
                    entry.abs_errors.extend(error.tolist())
                    if scale > 0:
                        entry.mase.setdefault(name, []).append(float(error.mean() / scale))
                ours = scores[h][OURS]
                inside = (actual >= forecast.lower[:h]) & (actual <= forecast.upper[:h])
                ours.inside.extend(inside.tolist())
                ours.models[forecast.model] = ours.models.get(forecast.model, 0) + 1
    return scores


def complete_hours(samples: pd.Series) -> pd.Series:
    """Hourly means, hours with under half the usual number of samples left out (the trace's
    first and last hours are cut short and would be scored on a handful of samples)."""
    counts = samples.resample(HOUR).count()
    usual = float(counts[counts > 0].median())
    return hourly(samples).where(counts >= usual / 2)


def _naive_scale(train: pd.Series, season: int) -> float:
    """In-sample mean absolute error of the seasonal naive forecast (MASE's denominator)."""
    values = train.to_numpy()
    diffs = np.abs(values[season:] - values[:-season])
    diffs = diffs[~np.isnan(diffs)]
    return float(diffs.mean()) if diffs.size else 0.0


def nab_origins(series: pd.Series) -> list[pd.Timestamp]:
    """Every 6 hours over the last five days, the whole next day always held back."""
    last = series.index[-1] + HOUR - pd.Timedelta(hours=24)
    return list(pd.date_range(last - pd.Timedelta(days=4), last, freq="6h"))


def alibaba_origins(series: pd.Series) -> list[pd.Timestamp]:
    """Every hour after the pod's first 6 measured hours (the pod's own day)."""
    real = series.dropna()
    if len(real) < 7:
        return []
    return list(series.index[series.index > real.index[5]])


def summarise(scores: dict[int, dict[str, Scores]]) -> dict[str, Any]:
    """Median-across-series MASE, mean absolute error, coverage and model mix per horizon."""
    out: dict[str, Any] = {}
    for h, methods in scores.items():
        row: dict[str, Any] = {}
        for method, entry in methods.items():
            per_series = {s: statistics.mean(v) for s, v in entry.mase.items()}
            row[method] = {
                "median_mase": statistics.median(per_series.values()) if per_series else None,
                "per_series_mase": per_series,
                "mae": statistics.mean(entry.abs_errors) if entry.abs_errors else None,
                "points": len(entry.abs_errors),
            }
        ours = methods[OURS]
        row["coverage_80"] = statistics.mean(ours.inside) if ours.inside else None
        row["models"] = ours.models
        out[f"{h}h"] = row
    return out


def synthetic_fleet(count: int, days: int, seed: int) -> dict[str, pd.Series]:
    """Hourly GPU-utilization-like series: a daily rhythm, AR(1) noise, a few gaps."""
    rng = np.random.default_rng(seed)
    hours = days * 24
    index = pd.date_range("2026-11-01", periods=hours, freq="h", tz="UTC")
    phase = 2 * np.pi * np.arange(hours) / 24
    out = {}
    for i in range(count):
        noise = np.zeros(hours)
        shocks = rng.normal(0, rng.uniform(2, 8), hours)
        for t in range(1, hours):
            noise[t] = 0.6 * noise[t - 1] + shocks[t]
        values = (
            rng.uniform(10, 70)
            + rng.uniform(0, 25) * np.sin(phase + rng.uniform(0, 2 * np.pi))
            + noise
        )
        values = np.clip(values, 0, 100)
        for _ in range(rng.integers(0, 4)):
            start = int(rng.integers(0, hours - 12))
            values[start : start + int(rng.integers(1, 10))] = np.nan
        out[f"gpu-{i}"] = pd.Series(values, index=index)
    return out


def speed(runs: int = 3) -> dict[str, Any]:
    """Wall time of ``fit_many`` on 500 synthetic 14-day series, horizon 24 h (in-process)."""
    fleet = synthetic_fleet(500, 14, seed=5)
    times = []
    models: dict[str, int] = {}
    for _ in range(runs):
        start = time.perf_counter()
        result = fit_many(fleet, 24, bounds=PERCENT)
        times.append(time.perf_counter() - start)
    for forecast in result.values():
        models[forecast.model] = models.get(forecast.model, 0) + 1
    return {"series": 500, "runs_s": times, "median_s": statistics.median(times), "models": models}


def speed_in_subprocesses() -> dict[str, Any]:
    """The speed part in fresh processes, ``OPENBLAS_NUM_THREADS`` unset and set to 1.

    A BLAS thread pool made the statsmodels fits ten times slower on a busy machine;
    ``fit_many`` limits its own thread to one BLAS thread, and the two runs show that it does
    not depend on the deployment setting the variable (which must be set before numpy loads,
    hence a process each).
    """
    out = {}
    for label, threads in (("unset", None), ("1", "1")):
        env = dict(os.environ)
        env.pop("OPENBLAS_NUM_THREADS", None)
        if threads:
            env["OPENBLAS_NUM_THREADS"] = threads
        done = subprocess.run(
            [sys.executable, "-m", "bench.forecast_backtest", "--speed-only"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out[label] = json.loads(done.stdout)
    return out


def _table(title: str, summary: dict[str, Any], methods: list[str]) -> Iterator[str]:
    horizons = list(summary)
    yield f"### {title}"
    yield ""
    yield "| method | " + " | ".join(f"MASE {h} | MAE {h}" for h in horizons) + " |"
    yield "|---|" + "---:|---:|" * len(horizons)
    for method in methods:
        cells = []
        for h in horizons:
            entry = summary[h][method]
            cells.append(_fmt(entry["median_mase"]))
            cells.append(_fmt(entry["mae"]))
        yield f"| {method} | " + " | ".join(cells) + " |"
    yield ""
    coverage = ", ".join(f"{h} {_fmt(100 * summary[h]['coverage_80'], 1)}%" for h in horizons)
    yield f"80% interval coverage ({OURS}): {coverage}"
    models = summary[horizons[0]]["models"]
    yield f"models chosen (fits): {models}"
    points = ", ".join(f"{h} {summary[h][OURS]['points']}" for h in horizons)
    yield f"scored hours: {points}"
    yield ""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed part")
    parser.add_argument("--speed-only", action="store_true", help="the speed part alone, as JSON")
    args = parser.parse_args(argv)
    if args.speed_only:
        print(json.dumps(speed()))
        return

    nab = summarise(backtest(load_nab(args.data), [1, 6, 24], nab_origins, 24, "seasonal naive"))
    pods = summarise(
        backtest(load_alibaba(args.data), [1, 6], alibaba_origins, 1, "naive (last hour)")
    )
    results: dict[str, Any] = {"nab": nab, "alibaba": pods}
    lines = list(
        _table(
            "NAB CPU utilization, median MASE across series (MAE in percentage points)",
            nab,
            [OURS, "seasonal naive", LINEAR_6H, LINEAR_H],
        )
    )
    lines += _table(
        "Alibaba GenAI pods, in-day, median MASE across pods (MAE in percentage points)",
        pods,
        [OURS, "naive (last hour)", LINEAR_6H, LINEAR_H],
    )
    if not args.no_speed:
        results["speed"] = speed_in_subprocesses()
        lines += ["### Speed: fit_many, 500 series x 14 days, horizon 24 h", ""]
        lines += [
            "| OPENBLAS_NUM_THREADS | median of 3 | runs | models chosen |",
            "|---|---:|---|---|",
        ]
        for threads, s in results["speed"].items():
            runs = ", ".join(f"{t:.2f}" for t in s["runs_s"])
            lines.append(f"| {threads} | {s['median_s']:.2f} s | {runs} | {s['models']} |")
        lines.append("")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

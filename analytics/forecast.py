"""Hourly forecasts of utilization and allocation series: pure pandas/statsmodels, no Flask.

The forecaster is additive exponential smoothing (Holt-Winters, statsmodels) chosen by AICc
among the random walk, a level model, a damped-trend model and seasonal models (daily from two
full days of history, weekly from two full weeks). Its prediction intervals are not the
model's Gaussian ones: they are empirical quantiles of the model's own in-sample forecast
errors at each horizon step, because utilization is spiky and skewed, and Gaussian intervals
misjudge it.

Gaps are never read as zeros. Gaps of up to :data:`MAX_INTERPOLATED_HOURS` are interpolated
for fitting only (and never scored as errors); longer ones are cut out together with enough
older hours to keep the seasonal phase, so the fit sees only hours that were measured. Under
:data:`MIN_SMOOTHING_HOURS` hours the forecast is the last value (``model == "naive"``); a
single value or a constant series gives ``"mean"``, and no data at all ``"none"``.

The baselines a user would otherwise reach for, Prometheus ``predict_linear`` and the seasonal
naive forecast, live here too so the benchmark and the tests use the same definitions.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.tsa.holtwinters import ExponentialSmoothing

HOUR = pd.Timedelta(hours=1)
DAY_HOURS = 24
WEEK_HOURS = 168
#: Longest gap (hours) bridged by linear interpolation for fitting; longer gaps are cut out.
MAX_INTERPOLATED_HOURS = 3
#: Fewer hours than this: no smoothing model is fitted, the random walk (last value) is used.
MIN_SMOOTHING_HOURS = 8
#: In-sample errors needed at a horizon step before its own quantiles are trusted.
MIN_ERRORS_PER_STEP = 12
#: Interval quantiles come from the errors on the last week's hours: the current regime.
RECENT_ERROR_HOURS = WEEK_HOURS
#: Beyond this step the interval grows like a random walk's instead of being measured.
MAX_MEASURED_STEPS = 2 * WEEK_HOURS

MODEL_WEEKLY = "ets-weekly"
MODEL_DAILY = "ets-daily"
MODEL_HOLT = "holt"
MODEL_SES = "ses"
MODEL_NAIVE = "naive"
MODEL_MEAN = "mean"
MODEL_NONE = "none"


@dataclass(frozen=True)
class Forecast:
    """A forecast for the hours after the history: mean and a prediction interval.

    ``model`` names what produced it: ``ets-weekly``/``ets-daily`` (Holt-Winters with that
    season), ``holt`` (damped trend), ``ses`` (level only), ``naive`` (the last value: short
    history, or the best by AICc), ``mean`` (one value or a constant series) or ``none`` (no
    data at all: the values are placeholders, report no forecast rather than them).
    """

    index: pd.DatetimeIndex
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    model: str
    level: float = 0.8


@dataclass(frozen=True)
class _Fit:
    """One fitted smoothing model on the standardised series, ready to forecast."""

    name: str
    aicc: float
    level: np.ndarray  # l_t after observing y_t
    trend: np.ndarray  # b_t (zeros without trend)
    seasons: np.ndarray  # s_{t-m} at index t, s_t at index t + m
    phi: float
    period: int
    params: int  # estimated parameters, initial states included (as in the AICc)


def hourly(samples: pd.Series) -> pd.Series:
    """Hourly means of irregular or sub-hourly samples, labelled by the hour's start (UTC).

    Hours without a sample stay NaN: a missing scrape is not a zero. Non-finite samples count
    as missing.
    """
    series = _as_utc(samples).astype("float64")
    series = series[np.isfinite(series.to_numpy())]
    if series.empty:
        return pd.Series([], index=pd.DatetimeIndex([], tz="UTC"), dtype="float64")
    return series.sort_index().resample(HOUR).mean()


def fit_forecast(
    history: pd.Series,
    horizon_hours: int,
    *,
    level: float = 0.8,
    bounds: tuple[float | None, float | None] = (None, None),
) -> Forecast:
    """Forecast the ``horizon_hours`` hours after ``history`` (an hourly series, NaN = gap).

    Never raises for the data's shape: short, constant, all-missing or extreme series get the
    simplest forecast that is still honest. ``bounds`` clips mean and interval (e.g. ``(0, 1)``
    for a ratio). Raises ValueError only for ``horizon_hours < 1``, a ``level`` outside (0, 1)
    or an index that is not a DatetimeIndex.
    """
    with _one_blas_thread():
        return _fit_forecast(history, horizon_hours, level=level, bounds=bounds)


def fit_many(
    histories: Mapping[str, pd.Series], horizon_hours: int, **kw: Any
) -> dict[str, Forecast]:
    """:func:`fit_forecast` for every series (keyword arguments passed on), keyed as given."""
    with _one_blas_thread():
        return {
            key: _fit_forecast(series, horizon_hours, **kw) for key, series in histories.items()
        }


def _fit_forecast(
    history: pd.Series,
    horizon_hours: int,
    *,
    level: float = 0.8,
    bounds: tuple[float | None, float | None] = (None, None),
) -> Forecast:
    """:func:`fit_forecast` without the BLAS thread setting (its callers set it once)."""
    if horizon_hours < 1:
        raise ValueError(f"horizon_hours must be at least 1, got {horizon_hours}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if not isinstance(history.index, pd.DatetimeIndex):
        raise ValueError("history must have a DatetimeIndex")
    stamps = _as_utc(history).index
    # The forecast starts after the history's last hour, measured or not.
    last_hour = stamps.max().floor("h") if len(stamps) else pd.Timestamp.now(tz="UTC").floor("h")
    index = pd.date_range(last_hour + HOUR, periods=horizon_hours, freq=HOUR)
    series = hourly(history)
    if series.empty:
        return _placeholder(index, bounds, level)
    values = series.reindex(pd.date_range(series.index[0], last_hour, freq=HOUR)).to_numpy()
    valid = np.flatnonzero(~np.isnan(values))
    # Hours missing at the end are forecast too, then dropped.
    skipped = len(values) - 1 - int(valid[-1])
    values = values[int(valid[0]) : int(valid[-1]) + 1]
    steps = skipped + horizon_hours
    with np.errstate(all="ignore"):
        mean, lower, upper, model = _forecast_values(values, steps, level)
    mean, lower, upper = _finish(mean[skipped:], lower[skipped:], upper[skipped:], bounds)
    return Forecast(index, mean, lower, upper, model, level)


def exhaustion_time(forecast: Forecast, capacity: float) -> pd.Timestamp | None:
    """The first forecast hour whose mean exceeds ``capacity``; None if none does."""
    above = np.flatnonzero(forecast.mean > capacity)
    return forecast.index[int(above[0])] if above.size else None


def predict_linear(history: pd.Series, horizon_hours: int, lookback_hours: int) -> np.ndarray:
    """Prometheus ``predict_linear(v[lookback], k * 3600)`` at the last sample, k = 1..horizon.

    As Prometheus 2.x does it: a least-squares line over the samples in the closed range
    ``[t - lookback, t]`` (t = the last sample's time), the intercept taken at t; a constant
    range has slope 0. Fewer than two samples give NaN (Prometheus returns nothing).
    """
    if horizon_hours < 1:
        raise ValueError(f"horizon_hours must be at least 1, got {horizon_hours}")
    series = _as_utc(history).astype("float64").sort_index()
    series = series[np.isfinite(series.to_numpy())]
    if series.empty:
        return np.full(horizon_hours, np.nan)
    now = series.index[-1]
    window = series[series.index >= now - pd.Timedelta(hours=lookback_hours)]
    if len(window) < 2:
        return np.full(horizon_hours, np.nan)
    y = window.to_numpy()
    x = (window.index - now).total_seconds().to_numpy()
    steps = np.arange(1, horizon_hours + 1) * 3600.0
    if np.all(y == y[0]):
        return np.full(horizon_hours, y[0])
    n = float(len(y))
    cov_xy = float(np.sum(x * y) - np.sum(x) * np.sum(y) / n)
    var_x = float(np.sum(x * x) - np.sum(x) ** 2 / n)
    if var_x == 0:  # several values at one instant: no line through them
        return np.full(horizon_hours, np.nan)
    slope = cov_xy / var_x
    intercept = float(np.sum(y) / n - slope * np.sum(x) / n)
    return intercept + slope * steps


def seasonal_naive(history: pd.Series, horizon_hours: int, season: int = DAY_HOURS) -> np.ndarray:
    """Each future hour repeats the same hour one season earlier (``season=1``: last value).

    Missing hours take the latest earlier season's value at that phase, else the last value;
    NaN only when the history has no value at all.
    """
    if horizon_hours < 1 or season < 1:
        raise ValueError(f"horizon_hours and season must be at least 1: {horizon_hours}, {season}")
    values = hourly(history).to_numpy()
    if not np.any(np.isfinite(values)):
        return np.full(horizon_hours, np.nan)
    last = values[np.isfinite(values)][-1]
    out = np.empty(horizon_hours)
    for k in range(1, horizon_hours + 1):
        source = len(values) - 1 + k - season * math.ceil(k / season)
        while source >= 0 and not np.isfinite(values[source]):
            source -= season
        out[k - 1] = values[source] if source >= 0 else last
    return out


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the fits with one OpenBLAS thread in this thread, then restore its setting.

    statsmodels fits through scipy's L-BFGS-B, whose BLAS calls work on vectors of a few dozen
    numbers: a BLAS thread pool only adds hand-offs, and on a busy two-core machine it made
    the fits ten times slower. ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 and later)
    changes the calling thread only, so other requests of a threaded server are untouched.
    Without it (another BLAS, not Linux) nothing changes; ``OPENBLAS_NUM_THREADS=1`` does the
    same for the whole process.
    """
    setters = _openblas_thread_setters()
    previous = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, count in zip(setters, previous, strict=True):
            setter(count)


@functools.cache
def _openblas_thread_setters() -> tuple[Callable[[int], int], ...]:
    """``openblas_set_num_threads_local`` of every OpenBLAS loaded (numpy's and scipy's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = {
        line.split()[-1]
        for line in maps.splitlines()
        if "openblas" in line.lower() and line.split()[-1].startswith("/")
    }
    setters = []
    for path in sorted(paths):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter.restype = ctypes.c_int
        setters.append(setter)
    return tuple(setters)


def _as_utc(series: pd.Series) -> pd.Series:
    """The series with a UTC DatetimeIndex (a naive index is taken to be UTC)."""
    if not isinstance(series.index, pd.DatetimeIndex):
        raise ValueError("series must have a DatetimeIndex")
    index = series.index
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    return series.set_axis(index)


def _forecast_values(
    values: np.ndarray, steps: int, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Mean and interval for ``steps`` hours after ``values`` (starting and ending real)."""
    real = values[~np.isnan(values)]
    if len(real) < 2 or np.ptp(real) == 0:
        return (*_mean_forecast(real, steps, level), MODEL_MEAN)
    # Standardised, so the optimiser behaves the same on ratios, percents and byte counts.
    center = float(np.median(real))
    scale = float(np.std(real - center))
    if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
        return (*_mean_forecast(real, steps, level), MODEL_MEAN)
    fit, data, measured = _select((values - center) / scale)
    if fit is None:
        return (*_mean_forecast(real, steps, level), MODEL_MEAN)
    point = _point_forecasts(fit, len(data) - 1, np.arange(1, steps + 1))
    low, high = _error_quantiles(fit, data, measured, steps, level)
    mean = center + scale * point
    lower = mean + scale * low
    upper = mean + scale * high
    if not (np.isfinite(mean).all() and np.isfinite(lower).all() and np.isfinite(upper).all()):
        return (*_mean_forecast(real, steps, level), MODEL_MEAN)
    return mean, lower, upper, fit.name


def _select(z: np.ndarray) -> tuple[_Fit | None, np.ndarray, np.ndarray]:
    """The candidate with the lowest AICc, the gap-cut data it was fitted on, and which of
    those hours were measured (not bridged).

    Candidates are compared on the same data only: with two clean weeks, all are fitted on the
    data cut to whole weeks; otherwise on data cut to whole days. The random walk is always a
    candidate, and under :data:`MIN_SMOOTHING_HOURS` hours it is the model.
    """
    data, measured = _prepare(z, DAY_HOURS)
    candidates: list[tuple[str, int]] = []
    if np.count_nonzero(~np.isnan(z)) >= 2 * WEEK_HOURS:
        weekly, weekly_measured = _prepare(z, WEEK_HOURS)
        if len(weekly) >= 2 * WEEK_HOURS:
            data, measured = weekly, weekly_measured
            candidates.append((MODEL_WEEKLY, WEEK_HOURS))
    if len(data) >= 2 * DAY_HOURS:
        candidates.append((MODEL_DAILY, DAY_HOURS))
    else:
        data, measured = _prepare(z, 1)
    if len(data) < 2:
        return None, data, measured
    naive = _naive_fit(data)
    if len(data) < MIN_SMOOTHING_HOURS:
        return naive, data, measured
    candidates += [(MODEL_HOLT, 1), (MODEL_SES, 1)]
    fits = [_fit(name, period, data) for name, period in candidates]
    usable = [fit for fit in [naive, *fits] if fit is not None and math.isfinite(fit.aicc)]
    return min(usable, key=lambda fit: fit.aicc) if usable else naive, data, measured


def _prepare(z: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Bridge short gaps linearly; cut longer ones out with older hours to keep the phase.

    A long gap is removed together with the hours just before it, so that the removed stretch
    is a whole number of seasons and the hours after the cut keep their place in the season.
    Returns the data and a mask of the hours that were measured (not bridged).
    """
    missing = np.isnan(z)
    keep = np.ones(len(z), dtype=bool)
    start = None
    for i in range(len(z) + 1):
        if i < len(z) and missing[i]:
            if start is None:
                start = i
            continue
        if start is not None:
            length = i - start
            if length > MAX_INTERPOLATED_HOURS:
                cut = -(-length // period) * period
                keep[max(0, i - cut) : i] = False
            start = None
    positions = np.arange(len(z))
    filled = z.copy()
    if missing.any():
        filled[missing] = np.interp(positions[missing], positions[~missing], z[~missing])
    data, measured = filled[keep], ~missing[keep]
    # A cut can leave the series starting inside an old gap's bridge: start at a real value.
    first = np.flatnonzero(measured)
    begin = int(first[0]) if first.size else len(data)
    return data[begin:], measured[begin:]


def _fit(name: str, period: int, data: np.ndarray) -> _Fit | None:
    """Fit one additive smoothing model with statsmodels; None when it cannot be fitted."""
    seasonal = period > 1
    trend = name == MODEL_HOLT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ExponentialSmoothing(
                data,
                trend="add" if trend else None,
                damped_trend=trend,
                seasonal="add" if seasonal else None,
                seasonal_periods=period if seasonal else None,
                # Estimating every initial season by optimisation costs several times the
                # rest of the fit and did not forecast better in the backtests.
                initialization_method="heuristic" if seasonal else "estimated",
            )
            result = model.fit(use_brute=False)
    except Exception:  # statsmodels/scipy failing on odd data must not fail the forecast
        return None
    params = result.params
    alpha = float(params["smoothing_level"])
    beta = float(params["smoothing_trend"]) if trend else 0.0
    gamma = float(params["smoothing_seasonal"]) if seasonal else 0.0
    phi = float(params["damping_trend"]) if trend else 1.0
    l0 = float(params["initial_level"])
    b0 = float(params["initial_trend"]) if trend else 0.0
    s0 = np.asarray(params["initial_seasons"], dtype=float) if seasonal else np.zeros(1)
    if not all(math.isfinite(v) for v in (alpha, beta, gamma, phi, l0, b0, *s0)):
        return None
    level, slope, seasons = _smooth(data, alpha, beta, gamma, phi, l0, b0, s0)
    # As statsmodels counts them for its AICc: initial states and smoothing parameters.
    count = period * seasonal + 2 * trend + 2 + trend
    return _Fit(name, float(result.aicc), level, slope, seasons, phi, len(s0), count)


def _naive_fit(data: np.ndarray) -> _Fit:
    """The random walk (level smoothing 1: the last value), scored like the other candidates."""
    n = len(data)
    sse = max(float(np.sum(np.diff(data) ** 2)), 1e-12 * n)
    count = 1  # the initial level
    dof = n - count - 3
    aicc = n * math.log(sse / n) + 2 * count
    aicc += 2 * (count + 2) * (count + 3) / dof if dof > 0 else math.inf
    return _Fit(MODEL_NAIVE, aicc, data.copy(), np.zeros(n), np.zeros(n + 1), 1.0, 1, count)


def _smooth(
    y: np.ndarray,
    alpha: float,
    beta: float,
    gamma: float,
    phi: float,
    l0: float,
    b0: float,
    s0: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The additive Holt-Winters states after each observation (statsmodels' recursion)."""
    m = len(s0)
    n = len(y)
    level = np.empty(n)
    trend = np.empty(n)
    seasons = np.zeros(n + m)
    seasons[:m] = s0
    seasonal = m > 1
    prev_l, prev_b = l0, b0
    for t, value in enumerate(y.tolist()):
        s_old = float(seasons[t]) if seasonal else 0.0
        base = prev_l + phi * prev_b
        new_l = alpha * (value - s_old) + (1 - alpha) * base
        new_b = beta * (new_l - prev_l) + (1 - beta) * phi * prev_b
        if seasonal:
            seasons[t + m] = gamma * (value - base) + (1 - gamma) * s_old
        level[t], trend[t] = new_l, new_b
        prev_l, prev_b = new_l, new_b
    return level, trend, seasons


def _point_forecasts(fit: _Fit, origins: np.ndarray | int, steps: np.ndarray) -> np.ndarray:
    """Forecasts from each origin (index of the last observation used) for each step ahead:
    a scalar origin gives one row, an array of origins a matrix (origins x steps)."""
    t = np.asarray(origins)[:, None] if np.ndim(origins) else np.asarray(origins)
    m = fit.period
    damp = np.cumsum(fit.phi ** np.arange(1, int(steps.max()) + 1))[steps - 1]
    # The season of step h is the last one seen for that phase: s_{t + h - m * ceil(h / m)}.
    season = fit.seasons[m + t + steps - m * -(-steps // m)] if m > 1 else 0.0
    return fit.level[t] + damp * fit.trend[t] + season


def _error_quantiles(
    fit: _Fit, data: np.ndarray, measured: np.ndarray, steps: int, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step quantiles of the model's in-sample forecast errors: the interval offsets.

    Only errors on measured hours of the last :data:`RECENT_ERROR_HOURS` count (the noise of
    the current regime), from origins past the first season (states still settling). In-sample
    errors understate out-of-sample ones, by about sqrt(n / (n - parameters)): they are widened
    by that. Steps with too few errors take the last well-measured step's offsets grown like a
    random walk's (square root of the step); the interval never narrows with the horizon.
    """
    n = len(data)
    burn = min(fit.period if fit.period > 1 else DAY_HOURS, n // 4)
    quantile_levels = [(1 - level) / 2, (1 + level) / 2]
    measurable = min(steps, MAX_MEASURED_STEPS, max(n - 1 - burn, 0))
    low = np.full(steps, np.nan)
    high = np.full(steps, np.nan)
    if measurable >= 1:
        origins = np.arange(burn, n - 1)
        step_numbers = np.arange(1, measurable + 1)
        targets = origins[:, None] + step_numbers
        wanted = (targets < n) & (targets >= n - RECENT_ERROR_HOURS)
        wanted &= measured[np.minimum(targets, n - 1)]
        errors = data[np.minimum(targets, n - 1)] - _point_forecasts(fit, origins, step_numbers)
        errors = np.where(wanted, errors, np.nan)
        good = wanted.sum(axis=0) >= MIN_ERRORS_PER_STEP
        if good.any():
            quantiles = np.nanquantile(errors[:, good], quantile_levels, axis=0)
            widen = math.sqrt(n / max(n - fit.params, 1))
            low[:measurable][good] = quantiles[0] * widen
            high[:measurable][good] = quantiles[1] * widen
    known = np.flatnonzero(~np.isnan(low))
    if known.size == 0:
        # Too short to measure multi-step errors: the spread of one-step changes, random-walk.
        changes = np.diff(data)
        if changes.size == 0:
            return np.zeros(steps), np.zeros(steps)
        q_low, q_high = np.quantile(changes - changes.mean(), quantile_levels)
        growth = np.sqrt(np.arange(1, steps + 1))
        return min(q_low, 0.0) * growth, max(q_high, 0.0) * growth
    last = int(known[-1])
    later = np.arange(last + 1, steps)
    low[later] = low[last] * np.sqrt((later + 1) / (last + 1))
    high[later] = high[last] * np.sqrt((later + 1) / (last + 1))
    # Steps in between without enough errors take the step before's offsets.
    low = pd.Series(low).ffill().bfill().to_numpy()
    high = pd.Series(high).ffill().bfill().to_numpy()
    low = np.minimum.accumulate(np.minimum(low, 0.0))
    high = np.maximum.accumulate(np.maximum(high, 0.0))
    return low, high


def _mean_forecast(
    real: np.ndarray, steps: int, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean of what there is, with the quantiles of the values around it as interval."""
    mean = float(np.mean(real)) if math.isfinite(float(np.mean(real))) else float(np.median(real))
    if len(real) < 2:
        return np.full(steps, mean), np.full(steps, mean), np.full(steps, mean)
    # A new value's spread around an estimated mean: the values' spread, a little wider.
    widen = math.sqrt(1 + 1 / len(real))
    q_low, q_high = np.quantile(real - mean, [(1 - level) / 2, (1 + level) / 2]) * widen
    return np.full(steps, mean), np.full(steps, mean + q_low), np.full(steps, mean + q_high)


def _finish(
    mean: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    bounds: tuple[float | None, float | None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip to the bounds, keep lower <= mean <= upper, and never hand out a NaN or inf."""
    low_bound = -np.inf if bounds[0] is None else bounds[0]
    high_bound = np.inf if bounds[1] is None else bounds[1]
    mean = np.clip(mean, low_bound, high_bound)
    lower = np.clip(np.minimum(lower, mean), low_bound, high_bound)
    upper = np.clip(np.maximum(upper, mean), low_bound, high_bound)
    bad = ~(np.isfinite(mean) & np.isfinite(lower) & np.isfinite(upper))
    if np.any(bad):
        mean = np.where(np.isfinite(mean), mean, np.clip(0.0, low_bound, high_bound))
        lower = np.where(np.isfinite(lower), lower, mean)
        upper = np.where(np.isfinite(upper), upper, mean)
    return mean, lower, upper


def _placeholder(
    index: pd.DatetimeIndex, bounds: tuple[float | None, float | None], level: float
) -> Forecast:
    """No data at all: zeros (within the bounds) labelled ``none``, so callers report none."""
    value = float(np.clip(0.0, -np.inf if bounds[0] is None else bounds[0], np.inf))
    if bounds[1] is not None:
        value = min(value, bounds[1])
    values = np.full(len(index), value)
    return Forecast(index, values, values.copy(), values.copy(), MODEL_NONE, level)

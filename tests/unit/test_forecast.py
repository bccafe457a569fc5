"""analytics.forecast on synthetic series: accuracy against a flat line, interval coverage,
gaps that stay gaps, fallbacks that say so, bounds, exhaustion and the Prometheus baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analytics import forecast
from analytics.forecast import Forecast

START = pd.Timestamp("2026-11-01", tz="UTC")


def hourly_series(values: np.ndarray | list[float], start: pd.Timestamp = START) -> pd.Series:
    return pd.Series(
        np.asarray(values, dtype=float),
        index=pd.date_range(start, periods=len(values), freq="h"),
    )


def daily_pattern(hours: int, seed: int, noise: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * np.arange(hours) / 24
    return 50 + 20 * np.sin(phase) + rng.normal(0, noise, hours)


def assert_finite(result: Forecast) -> None:
    for values in (result.mean, result.lower, result.upper):
        assert np.isfinite(values).all()
    assert (result.lower <= result.mean).all()
    assert (result.mean <= result.upper).all()


def test_a_daily_pattern_is_forecast_better_than_a_flat_line() -> None:
    values = daily_pattern(10 * 24 + 24, seed=1)
    history, future = hourly_series(values[:-24]), values[-24:]
    result = forecast.fit_forecast(history, 24)
    assert result.model == "ets-daily"
    assert len(result.index) == 24
    assert result.index[0] == history.index[-1] + pd.Timedelta(hours=1)
    ours = np.abs(result.mean - future).mean()
    flat = np.abs(history.mean() - future).mean()
    assert ours < 0.5 * flat


def test_the_80_percent_interval_covers_about_80_percent_of_new_noise() -> None:
    rng = np.random.default_rng(7)
    inside: list[bool] = []
    for _ in range(12):
        values = 40 + rng.normal(0, 5, 7 * 24 + 24)
        result = forecast.fit_forecast(hourly_series(values[:-24]), 24)
        future = values[-24:]
        inside.extend((future >= result.lower) & (future <= result.upper))
    assert 0.7 <= np.mean(inside) <= 0.9
    assert result.level == 0.8


def test_hourly_means_leave_missing_hours_missing() -> None:
    stamps = list(pd.date_range(START, periods=24, freq="5min"))  # hours 0 and 1
    stamps += list(pd.date_range(START + pd.Timedelta(hours=4), periods=12, freq="5min"))
    samples = pd.Series([10.0] * 12 + [20.0] * 12 + [30.0] * 12, index=pd.DatetimeIndex(stamps))
    result = forecast.hourly(samples)
    assert list(result.index.hour) == [0, 1, 2, 3, 4]
    assert result.iloc[:2].tolist() == [10.0, 20.0]
    assert result.iloc[2:4].isna().all()  # not 0
    assert result.iloc[4] == 30.0
    assert str(result.index.tz) == "UTC"


def test_a_gap_is_not_read_as_zeros() -> None:
    values = 50 + np.random.default_rng(3).normal(0, 2, 6 * 24)
    missing, zeros = values.copy(), values.copy()
    missing[-6:] = np.nan
    zeros[-6:] = 0.0
    from_missing = forecast.fit_forecast(hourly_series(missing), 6)
    from_zeros = forecast.fit_forecast(hourly_series(zeros), 6)
    # Same hours ahead: the forecast starts after the history, measured or not.
    assert from_missing.index.equals(from_zeros.index)
    assert np.abs(from_missing.mean - 50).max() < 5
    assert from_zeros.mean.max() < 40
    assert_finite(from_missing)


def test_a_long_gap_inside_the_history_is_skipped_not_filled() -> None:
    values = daily_pattern(12 * 24, seed=4)
    values[100:130] = np.nan
    result = forecast.fit_forecast(hourly_series(values), 24)
    assert result.model == "ets-daily"
    expected = 50 + 20 * np.sin(2 * np.pi * np.arange(12 * 24, 13 * 24) / 24)
    assert np.abs(result.mean - expected).mean() < 5
    assert_finite(result)


def test_short_history_falls_back_and_says_so() -> None:
    few = forecast.fit_forecast(hourly_series([10.0, 12.0, 11.0, 13.0, 30.0]), 3)
    assert few.model == "naive"
    assert few.mean.tolist() == [30.0, 30.0, 30.0]
    assert (few.upper > few.lower).all()
    day = forecast.fit_forecast(hourly_series(daily_pattern(30, seed=5)), 12)
    assert day.model in {"naive", "ses", "holt"}  # under two days: no season
    one = forecast.fit_forecast(hourly_series([7.0]), 2)
    assert one.model == "mean"
    assert one.mean.tolist() == [7.0, 7.0]


def test_a_constant_series_is_forecast_as_itself() -> None:
    result = forecast.fit_forecast(hourly_series([42.0] * 72), 24)
    assert result.model == "mean"
    assert (result.mean == 42.0).all()
    assert (result.lower == 42.0).all() and (result.upper == 42.0).all()


def test_no_data_gives_placeholders_labelled_none_never_nan() -> None:
    all_missing = forecast.fit_forecast(hourly_series([np.nan] * 30), 5, bounds=(0, 1))
    assert all_missing.model == "none"
    assert len(all_missing.index) == 5
    assert all_missing.index[0] == START + pd.Timedelta(hours=30)
    assert_finite(all_missing)
    empty = forecast.fit_forecast(hourly_series([]), 2)
    assert empty.model == "none"
    assert_finite(empty)


@pytest.mark.parametrize(
    "values",
    [
        -1e6 + np.random.default_rng(1).normal(0, 10, 100),
        1e15 * (1 + 0.1 * np.random.default_rng(2).random(100)),
        np.where(np.arange(100) % 7 == 0, np.inf, 5.0 + np.arange(100) % 3),
    ],
    ids=["negative", "huge", "with-inf"],
)
def test_odd_values_do_not_break_it(values: np.ndarray) -> None:
    assert_finite(forecast.fit_forecast(hourly_series(values), 24))


def test_bounds_clip_mean_and_interval() -> None:
    rising = np.linspace(0.5, 0.99, 96) + np.random.default_rng(6).normal(0, 0.02, 96)
    result = forecast.fit_forecast(hourly_series(rising), 48, bounds=(0.0, 1.0))
    for values in (result.mean, result.lower, result.upper):
        assert values.min() >= 0.0 and values.max() <= 1.0
    assert result.upper.max() == 1.0
    falling = forecast.fit_forecast(hourly_series(np.linspace(10, 1, 48)), 24, bounds=(0, None))
    assert falling.lower.min() == 0.0


def test_exhaustion_time_is_the_first_hour_over_capacity() -> None:
    index = pd.date_range(START, periods=5, freq="h")
    mean = np.array([5.0, 7.0, 8.0, 9.5, 11.0])
    result = Forecast(index, mean, mean - 1, mean + 1, "holt", 0.8)
    assert forecast.exhaustion_time(result, 8.0) == index[3]  # 8.0 is not over 8
    assert forecast.exhaustion_time(result, 20.0) is None


def test_predict_linear_is_prometheus_least_squares_from_the_last_sample() -> None:
    # Samples at -5 h (outside a 2 h lookback), -2 h (on its edge: Prometheus 2.x includes it),
    # -1 h and now. Over the last three: x = -7200, -3600, 0 s; y = 1, 2, 4. Slope
    # 3 / 7200 per second = 1.5 per hour; intercept at now 7/3 + 1.5 = 23/6.
    index = START + pd.to_timedelta([-5, -2, -1, 0], unit="h")
    history = pd.Series([100.0, 1.0, 2.0, 4.0], index=index)
    predicted = forecast.predict_linear(history, 2, lookback_hours=2)
    assert predicted == pytest.approx([23 / 6 + 1.5, 23 / 6 + 3.0])
    flat = pd.Series([3.0, 3.0, 3.0], index=index[1:])
    assert forecast.predict_linear(flat, 1, 6).tolist() == [3.0]
    assert np.isnan(forecast.predict_linear(history.iloc[-1:], 1, 6)).all()


def test_seasonal_naive_repeats_the_last_season() -> None:
    history = hourly_series(list(range(48)))
    assert forecast.seasonal_naive(history, 3, season=24).tolist() == [24.0, 25.0, 26.0]
    assert forecast.seasonal_naive(history, 26, season=24)[-2:].tolist() == [24.0, 25.0]
    assert forecast.seasonal_naive(history, 2, season=1).tolist() == [47.0, 47.0]


def test_fit_many_forecasts_every_series_by_key() -> None:
    histories = {"a": hourly_series(daily_pattern(72, seed=8)), "b": hourly_series([1.0, 2.0])}
    result = forecast.fit_many(histories, 6, bounds=(0, 100))
    assert set(result) == {"a", "b"}
    assert all(len(f.mean) == 6 for f in result.values())


def test_bad_arguments_raise_value_error() -> None:
    history = hourly_series(daily_pattern(48, seed=9))
    with pytest.raises(ValueError):
        forecast.fit_forecast(history, 0)
    with pytest.raises(ValueError):
        forecast.fit_forecast(pd.Series([1.0, 2.0, 3.0]), 1)  # a RangeIndex
    with pytest.raises(ValueError):
        forecast.predict_linear(history, 0, 6)

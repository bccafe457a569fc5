"""Recording rules, alerts and Grafana dashboards for the GPU metrics, generated from one file.

`monitoring/values.yaml` holds every threshold, window, selector and budget once;
`python -m monitoring.rules` writes `rules/gpu-recording.yml` and `rules/gpu-alerts.yml` from it,
`python -m monitoring.dashboards` writes `dashboards/*.json`.
"""

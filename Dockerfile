# syntax=docker/dockerfile:1.7
# Images of k8s-gpu-monitor: one file, one target per service.
#
#   docker build --target exporter  -t ghcr.io/k8s-gpu-monitor/gpu-exporter:0.1.0 .
#   docker build --target analytics -t ghcr.io/k8s-gpu-monitor/gpu-analytics:0.1.0 .
#
# Each service runs from its own virtualenv, built in a builder stage from binary wheels only
# (--only-binary: no compiler is ever needed or installed). The final stages copy that
# virtualenv onto the same slim Python base, without pip, setuptools or any build tool, and run
# as a non-root user. tests/unit/test_helm_chart.py checks these properties.

# The base of every stage, pinned to an exact Python patch release and Debian release.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- the project as a wheel -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
COPY analytics/ analytics/
COPY monitoring/ monitoring/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- the exporter's virtualenv: only the distributions exporter/ imports ----------------------
FROM ${PYTHON_IMAGE} AS build-exporter
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The exporter's third-party distributions; their version ranges are read from pyproject.toml,
# so this list names them without copying the pins. (pandas, statsmodels and Flask are the
# analytics' and stay out of this image.)
ARG EXPORTER_DISTRIBUTIONS="nvidia-ml-py prometheus-client PyYAML grpcio protobuf kubernetes bcrypt"
COPY pyproject.toml /src/
COPY --from=wheel /wheels /wheels
RUN python - <<'EOF' > /tmp/requirements.txt
import os, re, sys, tomllib

wanted = {name.lower() for name in os.environ["EXPORTER_DISTRIBUTIONS"].split()}
with open("/src/pyproject.toml", "rb") as f:
    requirements = tomllib.load(f)["project"]["dependencies"]
chosen = [r for r in requirements if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() in wanted]
found = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in chosen}
if found != wanted:
    sys.exit(f"not in pyproject.toml dependencies: {sorted(wanted - found)}")
print("\n".join(chosen))
EOF
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: --requirement /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- the analytics' virtualenv: the whole distribution ----------------------------------------
FROM ${PYTHON_IMAGE} AS build-analytics
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- what both final images share: Python without its installer -------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN rm -rf /usr/local/bin/pip* /usr/local/lib/python3.11/ensurepip \
    /usr/local/lib/python3.11/site-packages/pip /usr/local/lib/python3.11/site-packages/pip-* \
    /usr/local/lib/python3.11/site-packages/setuptools /usr/local/lib/python3.11/site-packages/setuptools-* \
    /usr/local/lib/python3.11/site-packages/wheel /usr/local/lib/python3.11/site-packages/wheel-*
# Byte code was compiled at install time; the root filesystem is read-only in the cluster.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.source="https://github.com/k8s-gpu-monitor/k8s-gpu-monitor" \
      org.opencontainers.image.licenses="Apache-2.0"

# --- gpu-exporter -----------------------------------------------------------------------------
# Non-root by default. The Helm chart runs it as UID 0 with every capability dropped, only to
# connect to the kubelet's root-owned pod-resources socket (values.yaml: exporter.runAsUser).
FROM runtime AS exporter
COPY --from=build-exporter /opt/venv /opt/venv
USER 65534:65534
EXPOSE 9400
ENTRYPOINT ["gpu-exporter"]

# --- gpu-analytics (the default target) -------------------------------------------------------
FROM runtime AS analytics
COPY --from=build-analytics /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["gpu-analytics"]

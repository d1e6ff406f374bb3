# syntax=docker/dockerfile:1
# The sidecar image: `sidecar run` by default; `sidecar inject ...` for the webhook.
# Build: docker build -t ghcr.io/agent-sidecar/sidecar:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: wheels for the package and every dependency (no compilers reach the runtime)
FROM ${PYTHON_IMAGE} AS builder
# SIDECAR_MYPYC=1: the per-request modules compiled by mypyc (setup.py), which needs a C compiler here
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 SIDECAR_MYPYC=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
RUN pip wheel --wheel-dir /wheels .

# ---- runtime: slim Python, the wheels installed, nothing else
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_CONFIG=/etc/sidecar/config/sidecar.yaml \
    TMPDIR=/var/run/sidecar
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels agent-sidecar \
 && groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sidecar \
 && mkdir -p /var/run/sidecar /var/run/intercept /etc/sidecar/config /etc/sidecar/policy \
 && chown 10001:10001 /var/run/sidecar /var/run/intercept
# state_dir (dev CA, interception CA key, admin token) lives on an emptyDir mounted here;
# the root filesystem can then be read-only.
WORKDIR /var/run/sidecar
USER 10001:10001
# inbound (mTLS), health, metrics; outbound 17001 and admin 17000 are loopback-only by design.
EXPOSE 17443 17021 17090
STOPSIGNAL SIGTERM
# Docker only (Kubernetes ignores HEALTHCHECK and uses the pod's probes); slim has no curl.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:17021/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run"]

# syntax=docker/dockerfile:1
# The API image: gunicorn + uvicorn workers, non-root, read-only root filesystem friendly.
# Writable paths are only the declared volumes: /data (uploads, APP_DATA_DIR) and /tmp
# (temporary files and the Prometheus multiprocess directory; mount a tmpfs there).
# BASE_IMAGE can be swapped for a local image with Python 3.11+ and python3-venv.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A package index other than the default (a mirror or proxy), for this stage's pip only.
ARG PIP_INDEX_URL
WORKDIR /build
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
# A regular (not editable) install: the migration scripts ship inside the package.
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_ENV=production \
    APP_DATA_DIR=/data \
    APP_LOG_FORMAT=json \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    GUNICORN_BIND=0.0.0.0:8000
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
COPY deploy/gunicorn.conf.py deploy/entrypoint.sh deploy/healthcheck.py /opt/app/
WORKDIR /opt/app
USER 10001:10001
VOLUME ["/data", "/tmp"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "/opt/app/healthcheck.py"]
ENTRYPOINT ["/opt/app/entrypoint.sh"]
CMD ["serve"]

"""Metrics, logs and traces: what SREs see of the service."""

# The gunicorn worker's slot (0…N-1), set by deploy/gunicorn.conf.py in each worker:
# the stable, pid-free identity of per-worker metric series.
WORKER_ID_ENV = "APP_WORKER_ID"

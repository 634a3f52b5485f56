#!/bin/sh
# Container entrypoint. `serve` (the default) execs gunicorn, so it is PID 1 and receives
# the stop signal itself; gunicorn.conf.py empties the Prometheus multiprocess directory
# (files left by a previous container run would be added to this one's counters).
# Anything else runs as given: `python -m app migrate`, `python -m app create-superuser`.
set -eu

if [ "${1:-serve}" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus}"
    exec gunicorn --config "$(dirname "$0")/gunicorn.conf.py" "$@"
fi
exec "$@"

#!/bin/sh
# Container entrypoint. `serve` (the default) empties the Prometheus multiprocess
# directory — files left by a previous container run would be added to this one's
# counters — and execs gunicorn, so it is PID 1 and receives the stop signal itself.
# Anything else runs as given: `python -m app migrate`, `python -m app create-superuser`.
set -eu

if [ "${1:-serve}" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    metrics_dir="${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus}"
    rm -rf "$metrics_dir"
    mkdir -p "$metrics_dir"
    export PROMETHEUS_MULTIPROC_DIR="$metrics_dir"
    exec gunicorn --config "$(dirname "$0")/gunicorn.conf.py" "$@"
fi
exec "$@"

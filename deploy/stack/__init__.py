"""The native stack: the compose topology from system packages, without Docker.

Run it with `python -m deploy.stack` (or `make stack`); the tests and the load tests use the
same servers.
"""

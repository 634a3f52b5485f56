"""How the service runs: gunicorn config, container entrypoint, the native stack."""

"""A FastAPI service shipped with its deployment, monitoring and load-test bundle."""

__version__ = "0.1.0"

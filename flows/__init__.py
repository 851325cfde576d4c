"""Prefect flows: control flow only; the work happens in ``tasks``."""

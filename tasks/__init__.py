"""Prefect tasks: each wraps one ``dcml`` call, reads inputs from paths, writes outputs, returns paths."""

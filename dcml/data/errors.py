"""The one exception raised for bad dataset files and folders."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or folder is missing, empty, corrupt or inconsistent.

    The message always names the offending file or folder.
    """

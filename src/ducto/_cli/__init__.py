"""The pieces of the ``ducto`` command line; the entry point is `ducto.cli.main`."""

from __future__ import annotations

"""``python -m ducto``: the ``ducto`` command line."""

from __future__ import annotations

import sys

from ducto.cli import main

if __name__ == "__main__":
    sys.exit(main())

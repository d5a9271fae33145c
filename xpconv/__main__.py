"""``python -m xpconv``: the ``xpconv`` command (see :mod:`xpconv.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

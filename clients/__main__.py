"""``python -m clients ...``: the same CLI as the ``stadapter`` console script."""

import sys

from .cli import main

sys.exit(main())

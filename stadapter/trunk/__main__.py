"""``python -m stadapter.trunk init|show``: create or check a trunk folder (the CLI lives in :mod:`stadapter.factory`).

A ``__main__`` module of its own, so running the CLI does not load ``stadapter.trunk`` a second time.
"""

from ..factory import trunk_cli

trunk_cli()

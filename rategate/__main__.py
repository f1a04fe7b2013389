"""``python -m rategate``: the command line (see :mod:`rategate.cli`)."""

from .cli import main

raise SystemExit(main())

"""``python -m eoq ...`` is the ``eoq`` command."""

from .cli import main

raise SystemExit(main())

"""``python -m hfbuilder``: the same as the ``hfbuilder`` command."""

from .cli import main

raise SystemExit(main())

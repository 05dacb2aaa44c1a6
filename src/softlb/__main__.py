"""``python -m softlb``: the ``softlb`` command line."""

from softlb.cli import main

raise SystemExit(main())

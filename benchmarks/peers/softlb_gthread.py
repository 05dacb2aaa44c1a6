"""``softlb serve`` with gunicorn's stock ``gthread`` worker for ``--engine threads``.

For ``bench_worker.py`` only: the product has no switch for this (issue #12 asks whether the
:mod:`softlb.worker` subclass pays for its use of gunicorn internals). This script runs the
same CLI, config and gunicorn settings, only with gunicorn's own worker class name
(``worker_class = "gthread"``, what ``gunicorn -k gthread`` selects) in place of
``softlb.worker.SoftLBWorker``. Run it with the Python of softlb's venv:
``python softlb_gthread.py serve --config C --workers 1 --engine threads --threads 16``.
"""

import sys

import softlb.server
from softlb.cli import main

softlb.server.ENGINES["threads"] = "gthread"  # type: ignore[index]  # Final dict, benchmark only

if __name__ == "__main__":
    sys.exit(main())

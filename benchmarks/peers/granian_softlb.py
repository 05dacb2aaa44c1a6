"""softlb's own WSGI app (``softlb.wsgi:create_app``) served by granian instead of gunicorn.

The peers venv has granian, not softlb: ``BENCH_SOFTLB_SITE`` names the site-packages of
softlb's venv, added *after* this venv's own (its .pth files included, so an editable install
of softlb is found; ``PYTHONPATH`` still comes first). ``BENCH_SOFTLB_CONFIG`` is the config.
Run: ``granian --interface wsgi --workers 1 --blocking-threads 16 granian_softlb:app``.
"""

import os
import site

site.addsitedir(os.environ["BENCH_SOFTLB_SITE"])

from softlb.wsgi import create_app

app = create_app(os.environ["BENCH_SOFTLB_CONFIG"])

"""gunicorn settings for running softlb under a plain ``gunicorn`` command.

    gunicorn -c examples/gunicorn.conf.py 'softlb.wsgi:create_app("examples/config.json")'

``softlb serve`` does all of this by itself; use this file when gunicorn must be started
directly (a process manager that expects it, extra gunicorn settings). Flags given on the command
line override what is set here, e.g. ``-b 0.0.0.0:8080``.
"""

import copy
import os
from typing import Any

from gunicorn.glogging import CONFIG_DEFAULTS

# The balancer spends its time waiting on backends, not computing: one process with a pool of
# threads ("gthread") serves many slow requests at once. Never gunicorn's default "sync" worker:
# it proxies one request at a time, so one slow backend holds up every other request (softlb
# logs a warning if it finds itself there).
worker_class = "gthread"
threads = 16
# One worker keeps its pool (membership, health, in-flight counts) to itself. For several, give
# them a store to share it through, or an admin change reaches only the worker that served it:
# "state" in the config, or SOFTLB_STATE below (e.g. "sqlite:////run/softlb/state.db"); see the
# docs' scaling page. (`softlb serve --workers N` makes one by itself.)
workers = 1

# Listen on this machine only: the admin API has no token unless the config sets one.
bind = "127.0.0.1:8080"

# On SIGTERM, stop accepting and give in-flight requests this long to finish. (Under plain
# gunicorn, SIGINT / Ctrl-C is a *quick* shutdown that cuts requests off; `softlb serve` makes it
# graceful too.)
graceful_timeout = 30

# The master kills a worker that has not reported for this long. A gthread worker keeps reporting
# while its threads wait on backends, so this only catches a wedged worker; keep it above the
# config's read timeout (30 s by default).
timeout = 60

# Seconds an idle client connection is kept open.
keepalive = 5

# Build the app in each worker, never in the master (see post_worker_init below).
preload_app = False

# Size the backend connection pools to the thread count (create_app() reads SOFTLB_THREADS).
raw_env = [f"SOFTLB_THREADS={threads}"]

# gunicorn >= 25.1 opens a control socket at one path per user; two balancers on one machine would
# fight over it. Older gunicorn versions ignore this setting.
control_socket_disable = True

accesslog = None  # "-" logs every request on stdout
errorlog = "-"
loglevel = "info"

# softlb's own log: backends going down and up (WARNING/INFO), admin changes (INFO), failed tries,
# one line each, on stderr with time, process and level like gunicorn's, or one JSON object per
# line with SOFTLB_LOG_FORMAT=json. (Without this, create_app() sets up the same by itself; this is
# the place to send it elsewhere, e.g. a FileHandler.) gunicorn replaces each top-level key of its
# own defaults with ours, so they are copied in. A logconfig_dict turns gunicorn's access log on:
# its logger is kept quiet below unless `accesslog` is set.
_softlb_formatter = (
    {"()": "softlb.logs.JsonFormatter"}
    if os.environ.get("SOFTLB_LOG_FORMAT") == "json"
    else {
        "format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        "datefmt": "%Y-%m-%d %H:%M:%S %z",
    }
)
logconfig_dict = copy.deepcopy(CONFIG_DEFAULTS)
logconfig_dict["formatters"]["softlb"] = _softlb_formatter
logconfig_dict["handlers"]["softlb"] = {
    "class": "logging.StreamHandler",
    "formatter": "softlb",
    "stream": "ext://sys.stderr",
}
logconfig_dict["loggers"]["softlb"] = {"level": "INFO", "handlers": ["softlb"], "propagate": False}
if accesslog is None:
    logconfig_dict["loggers"]["gunicorn.access"]["level"] = "WARNING"


def post_worker_init(worker: Any) -> None:
    """Runs in each worker once the app is loaded, i.e. after the fork.

    Nothing of softlb is started before the fork: threads do not survive fork(), so a health
    checker started in the master would silently never probe in the workers, and a connection
    opened in the master would be shared by every worker. gunicorn loads the app, with
    preload_app off, in the worker itself: that is when softlb.wsgi.create_app() builds the pool,
    starts the health-check thread and opens backend connections, one set per worker. (With
    --preload the app is built in the master, and softlb starts a fresh checker and fresh
    connection pools in each worker right after the fork; the default above avoids even that.)
    """
    worker.log.info("softlb app ready in worker %s", worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """Runs in a worker that is exiting: stop the health checker, close backend connections."""
    app = getattr(worker, "wsgi", None)
    stop = getattr(app, "stop", None)
    if callable(stop):
        stop()

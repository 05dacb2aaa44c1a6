"""gunicorn settings for running softlb under a plain ``gunicorn`` command.

    gunicorn -c examples/gunicorn.conf.py 'softlb.wsgi:create_app("examples/config.json")'

``softlb serve`` does all of this by itself; use this file when gunicorn must be started
directly (a process manager that expects it, extra gunicorn settings). Flags given on the command
line override what is set here, e.g. ``-b 0.0.0.0:8080``.
"""

from typing import Any

# The balancer spends its time waiting on backends, not computing: one process with a pool of
# threads ("gthread") serves many slow requests at once. Until shared state lands, keep one worker:
# each worker process has its own pool (membership, health, in-flight counts), so an admin change
# would reach only the worker that served it.
worker_class = "gthread"
workers = 1
threads = 16

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

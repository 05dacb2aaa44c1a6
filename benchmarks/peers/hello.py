"""A gunicorn hello-world app: the ceiling of any Python WSGI app on this machine.

It answers ``/big`` with 256 KiB and anything else with the same ~100 bytes the nginx
backends serve, without talking to a backend.
"""

SMALL = b"softlb benchmark: a small answer of about one hundred bytes, "
SMALL += b"the size of a tiny JSON reply.\n"
BIG = b"x" * (256 * 1024)


def app(environ, start_response):
    body = BIG if environ["PATH_INFO"] == "/big" else SMALL
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

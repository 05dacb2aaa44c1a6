"""A backend that reads every request body to its end before it answers, at a set pace.

``python sink.py PORT [BYTES_PER_SECOND]`` (0 or absent: as fast as it can). GET and HEAD get
``200 ok`` at once (health checks); a request with a body (``Content-Length`` or chunked) gets
``200 ok`` once the whole body was read. Keep-alive; one thread per connection; a connection
idle or stalled for 30 s is closed.

nginx's ``return 200`` answers before it reads a body, and softlb's event-loop engine passes
such an early answer on and stops the upload, as nginx does: an upload benchmark needs a
backend that reads it all.
"""

import socket
import socketserver
import sys
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
TICK = 0.1


def main() -> None:
    port = int(sys.argv[1])
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    per_tick = rate * TICK if rate > 0 else 0

    class Handler(socketserver.StreamRequestHandler):
        rbufsize = 65536

        def swallow(self, size: int) -> bool:
            """Read ``size`` bytes, at the pace; False if the peer went away first."""
            while size > 0:
                tick = time.monotonic()
                want = min(size, int(per_tick)) if per_tick else min(size, 1 << 20)
                data = self.rfile.read(want)
                if not data:
                    return False
                size -= len(data)
                if per_tick:
                    time.sleep(max(TICK - (time.monotonic() - tick), 0))
            return True

        def handle(self) -> None:
            self.request.settimeout(30)
            try:
                while True:
                    line = self.rfile.readline(65537)
                    if not line:
                        return
                    headers = {}
                    while (field := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                        name, _, value = field.decode("latin-1").partition(":")
                        headers[name.strip().lower()] = value.strip()
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        while True:
                            size = int(self.rfile.readline(1024).split(b";")[0], 16)
                            if not self.swallow(size) or not self.rfile.readline(1024):
                                return
                            if size == 0:
                                break
                    elif not self.swallow(int(headers.get("content-length", "0"))):
                        return
                    self.wfile.write(OK)
            except (OSError, ValueError):
                return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

        def server_bind(self) -> None:
            if per_tick:  # a slow reader keeps a small receive window
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            super().server_bind()

    with Server(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()

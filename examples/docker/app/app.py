#!/usr/bin/env python3
"""A tiny web app to try examples/docker/control.sh with: it answers / with
its version and /health with 200.  PORT (default 8080) and VERSION come
from the environment (the Dockerfile sets them)."""

import http.server
import os
import sys


class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok\n"
        elif self.path == "/":
            body = ("hello from %s\n" % os.environ.get("VERSION", "dev")).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(
        ("0.0.0.0", int(os.environ.get("PORT", "8080"))), App)
    print("listening on port %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)

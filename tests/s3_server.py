"""A real S3-protocol server on loopback for the tests: moto's S3 backend behind a
werkzeug HTTP server, in its own process. Prints the port, then serves until killed.

Requests are handled one at a time on purpose: moto checks `If-None-Match: *` and then
stores, in two steps; a lock around the application makes that check-and-store atomic,
which is the guarantee real S3 and MinIO give. (Unlocked, racing writers could both
"win" inside moto, which would test moto, not us.)"""
import sys
import threading

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def serialized(app):
    lock = threading.Lock()

    def locked_app(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    return locked_app


def main() -> None:
    app = serialized(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

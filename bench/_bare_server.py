"""The reference server of api_throughput.py: a bare Flask app with one JSON route under waitress.

Run as: python bench/_bare_server.py PORT THREADS   (binds 127.0.0.1 only)
"""

from __future__ import annotations

import sys

import waitress
from flask import Flask, jsonify

# The same fields (and about the same size) as onprem-label's GET /api/v1/me answer.
BODY = {"id": 2, "username": "bench", "display_name": "bench", "roles": ["labeler"],
        "active": True, "totp_enabled": False, "locked_until": None}


def make_app() -> Flask:
    """One route, no extensions, no database: the floor any Flask app on waitress stands on."""
    app = Flask("bare")

    @app.get("/api/v1/me")
    def me():
        return jsonify(BODY)

    return app


def main() -> None:
    port, threads = int(sys.argv[1]), int(sys.argv[2])
    server = waitress.create_server(make_app(), host="127.0.0.1", port=port, threads=threads,
                                    ident="bare")
    print(f"bare Flask serving on http://127.0.0.1:{server.effective_port}/ with {threads} threads",
          flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()

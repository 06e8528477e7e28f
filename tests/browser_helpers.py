"""Browser tests: Debian's Chromium driven by Playwright against a real server on loopback.

Chromium comes from Debian (`/usr/bin/chromium`), installed here when it is missing; Playwright
never downloads a browser. Every browser runs with networking to anywhere but our server off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from debian_packages import ensure_program

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PASSWORD = "correct horse battery staple"


def ensure_chromium() -> str:
    """The path of Debian's Chromium, installing the package when it is missing (as root, with apt)."""
    return ensure_program(CHROMIUM, "chromium")


@dataclass
class LiveServer:
    """The app under waitress on a loopback port, in a thread of the test process."""

    app: object
    url: str
    server: object
    thread: threading.Thread
    requests: list = field(default_factory=list)

    def stop(self) -> None:
        """Close the listening socket and wait for the thread."""
        self.server.close()
        self.thread.join(timeout=10)


def start_server(app) -> LiveServer:
    """Serve `app` on 127.0.0.1 and an ephemeral port."""
    import waitress

    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=6, ident="onprem-label-test")
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    return LiveServer(app, f"http://127.0.0.1:{server.effective_port}", server, thread)


def make_people(db, *names_roles) -> dict:
    """Users (no forced password change) by name: make_people(db, ("lab", "labeler"), ...)."""
    from onprem_label.auth import accounts

    now = datetime.now(timezone.utc)
    users = {name: accounts.create_user(db, name, PASSWORD, [role], display_name=name.title(),
                                        must_change_password=False, now=now) for name, role in names_roles}
    db.commit()
    return users


class BrowserSession:
    """One logged-in browser context; every request and document response it sees is kept."""

    def __init__(self, browser, server: LiveServer, viewport=(1366, 768)):
        self.server = server
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                           base_url=server.url)
        self.requests: list[str] = []
        self.documents: list = []  # (url, headers) of every page
        self.console_errors: list[str] = []
        self.titles: list[str] = []  # of every page loaded
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.context.on("response", self._response)
        self.page = self.new_page()

    def _response(self, response) -> None:
        if response.request.resource_type == "document":
            self.documents.append((response.url, response.headers))

    def new_page(self):
        """A tab of this session (errors on its console are kept)."""
        page = self.context.new_page()
        page.on("console", lambda m: self.console_errors.append(f"{m.text} {m.location.get('url', '')}")
                if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))
        page.on("load", lambda loaded: self.titles.append(loaded.title()))
        return page

    def login(self, username: str, password: str = PASSWORD) -> None:
        """Through the real login form."""
        page = self.page
        page.goto("/login")
        page.fill("#username", username)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.wait_for_load_state("load")

    def close(self) -> None:
        """End the context."""
        self.context.close()

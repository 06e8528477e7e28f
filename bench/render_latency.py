"""Benchmark: render a 512 x 512 CT slice with a window to PNG, uncached and from the rendition cache.

Goals (issue 4): median <= 20 ms uncached; median <= 3 ms cached (renditions.frame_png).
Usage: .venv/bin/python bench/render_latency.py [--iterations 50] [--rounds 3] [--tmp /tmp]

One slice (the synthetic CT of ingest_throughput.py) is ingested by `onprem-label ingest` into a
fresh data directory; then, in this process, on that data directory:
  - frame_png(db, store, item, 0, Window(c, 400), now=...) timed alone. Each call gets a fresh
    session with the item and its images already loaded (as a request has them by the time it
    renders), and is committed after the timer stops. Uncached: a window never asked for before
    (center 40 + i), so it decodes, windows, encodes and stores the PNG in the cache; cached:
    Window(40, 400) again and again, so it finds the rendition row and reads the blob back.
  - the same through the Flask test client, `GET /api/v1/items/<id>/image?window=400&level=L`
    with a bearer token (authentication, audit event and commit included; no socket), for reference;
  - the parts of one uncached render timed one by one (no goal; where the time goes).
Each round waits for a quiet machine first; figures are medians and p90 over all rounds.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import _common as c
from ingest_throughput import ct_slice, phantom

UNCACHED_GOAL_MS = 20.0
CACHED_GOAL_MS = 3.0
BENCH_PASSWORD = "render timing passphrase 7431"


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of the sorted values lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def ingest_one_slice(base: Path) -> Path:
    """A fresh data directory holding one ingested 512 x 512 CT slice; the data directory."""
    import numpy as np
    from pydicom.uid import generate_uid

    data = c.init_data_dir(base)
    c.run_cli(data, "project", "create", "Render bench")
    ds = ct_slice(patient=1, series_uid=generate_uid(), study_uid=generate_uid(), frame_uid=generate_uid(),
                  number=1, z=-120.0, pixels=phantom(np.random.default_rng(7), 120.0))
    path = base / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = c.run_cli(data, "ingest", "Render bench", str(path))
    if "1 imported" not in out:
        raise RuntimeError(f"the slice was not imported: {out.strip()}")
    return data


class Site:
    """The data directory opened in this process: settings, store, sessions and the item's id."""

    def __init__(self, data: Path):
        from sqlalchemy import select

        from onprem_label.config import load_settings
        from onprem_label.db import make_engine
        from onprem_label.db.models import Item
        from onprem_label.storage import open_keyring, open_store

        self.settings = load_settings({"data_dir": str(data)}, env={})
        self.keyring = open_keyring(self.settings)
        self.store = open_store(self.settings, self.keyring)
        self.engine = make_engine(self.settings.effective_database_url)
        self.sessionmaker = c.site_sessionmaker(data, self.engine)
        with self.sessionmaker() as db:
            self.item_id = db.scalars(select(Item.id)).one()

    def render(self, center: float) -> tuple[float, bytes]:
        """(s, PNG) of one frame_png call at Window(center, 400) in a fresh session; committed after."""
        from onprem_label.clock import utcnow
        from onprem_label.db.models import Item
        from onprem_label.imaging.render import Window
        from onprem_label.imaging.renditions import frame_png

        with self.sessionmaker() as db:
            item = db.get(Item, self.item_id)
            _ = [image.blob_id for image in item.images]  # loaded before the timer, as in a request
            window, now = Window(center, 400), utcnow()
            t0 = time.perf_counter()
            png = frame_png(db, self.store, item, 0, window, now=now)
            seconds = time.perf_counter() - t0
            db.commit()
        return seconds, png

    def parts(self, center: float) -> dict[str, float]:
        """Seconds of each part of an uncached render, called one after the other."""
        import pydicom

        from onprem_label.db.models import Item
        from onprem_label.imaging import render

        with self.sessionmaker() as db:
            image = db.get(Item, self.item_id).images[0]
            blob_id = image.blob_id
            t0 = time.perf_counter()
            reader = self.store.open(blob_id)
            ds = pydicom.dcmread(reader)
            t1 = time.perf_counter()
            pixels = render.decode_frame(ds, 0)
            t2 = time.perf_counter()
            display = render.display_array(ds, pixels, render.Window(center, 400))
            t3 = time.perf_counter()
            png = render.encode_png(display)
            t4 = time.perf_counter()
            ref = self.store.put(io.BytesIO(png))
            t5 = time.perf_counter()
            reader.close()
            t6 = time.perf_counter()
            with self.store.open(ref.blob_id) as cached:
                cached.read()
            t7 = time.perf_counter()
        self.store.delete(ref.blob_id)
        return {"open+dcmread": t1 - t0, "decode_frame": t2 - t1, "window (display_array)": t3 - t2,
                "encode_png": t4 - t3, "store.put (cache write, fsync)": t5 - t4,
                "cached read (open+read)": t7 - t6}

    def close(self) -> None:
        """Dispose of the engine."""
        self.engine.dispose()


def api_client(site: Site):
    """(Flask test client, bearer headers) of the app, with the token of a labeler of the project."""
    from onprem_label.app import create_app
    from onprem_label.auth import accounts, tokens
    from onprem_label.clock import utcnow
    from onprem_label.db.models import Item, Project

    app = create_app(site.settings, keyring=site.keyring)
    with site.sessionmaker() as db:
        user = accounts.create_user(db, "bench", BENCH_PASSWORD, ["labeler"], must_change_password=False,
                                    now=utcnow())
        try:
            from onprem_label.workflow.members import add_member
        except ImportError:  # before project membership (commit d4d26de): any labeler reads items
            pass
        else:
            project = db.get(Project, db.get(Item, site.item_id).project_id)
            add_member(db, project, "bench", "labeler", actor=None, now=utcnow())
        secret, _ = tokens.create_token(db, user, "bench", now=utcnow())
        db.commit()
    return app, app.test_client(), {"Authorization": f"Bearer {secret}"}


def http_get(client, headers: dict, item_id: int, level: float) -> tuple[float, bytes]:
    """(s, PNG) of one GET of the item's image at window 400, level `level`."""
    t0 = time.perf_counter()
    response = client.get(f"/api/v1/items/{item_id}/image?window=400&level={level:g}", headers=headers)
    seconds = time.perf_counter() - t0
    if response.status_code != 200 or response.mimetype != "image/png":
        raise RuntimeError(f"GET image answered {response.status_code}: {response.get_data()[:200]!r}")
    return seconds, response.get_data()


def check_png(png: bytes) -> None:
    """The answer is a 512 x 512 greyscale PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        if image.size != (512, 512) or image.mode != "L":
            raise RuntimeError(f"unexpected PNG {image.size} {image.mode}")


def one_round(site: Site, client, headers: dict, iterations: int,
              first_center: int) -> dict[str, list[float]]:
    """Timed calls of every kind; centers from `first_center` up are each used once (uncached)."""
    times: dict[str, list[float]] = {"frame_png uncached": [], "frame_png cached": [],
                                     "HTTP uncached": [], "HTTP cached": []}
    for i in range(iterations):
        times["frame_png uncached"].append(site.render(first_center + i)[0])
        times["frame_png cached"].append(site.render(40)[0])
        level = first_center + iterations + i
        times["HTTP uncached"].append(http_get(client, headers, site.item_id, level)[0])
        times["HTTP cached"].append(http_get(client, headers, site.item_id, 40)[0])
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50, help="timed calls of each kind per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each after waiting for quiet")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data directory goes")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many s for the machine to go idle before each round")
    args = parser.parse_args()
    iterations, rounds = max(5, min(args.iterations, 1000)), max(1, min(args.rounds, 20))

    print(c.machine_summary())
    with tempfile.TemporaryDirectory(prefix="onprem-bench-", dir=args.tmp) as tmp:
        c.set_pycache_dir(Path(tmp) / "pycache")
        site = Site(ingest_one_slice(Path(tmp)))
        try:
            app, client, headers = api_client(site)
            for center in (40, 41, 42, 43, 44):  # warm-up: imports, caches, the cached rendition
                check_png(site.render(center)[1])
                check_png(http_get(client, headers, site.item_id, center)[1])
            print(f"one 512 x 512 int16 CT slice ingested; item {site.item_id}; PNG at window 400/40 "
                  f"{len(site.render(40)[1])} bytes; store on {tmp}")
            samples: dict[str, list[float]] = {}
            for r in range(rounds):
                before, waited = c.wait_for_quiet(args.quiet_wait)
                load = c.MachineLoad().start()
                times = one_round(site, client, headers, iterations, 1000 + r * 2 * iterations)
                busy = load.stop()
                print(f"round {r + 1}: " + "; ".join(f"{k} median {1000 * c.median(v):.2f} ms"
                                                     for k, v in times.items())
                      + f"; machine busy before {before:.0%} (waited {waited:.0f} s), during {busy:.0%}")
                for key, values in times.items():
                    samples.setdefault(key, []).extend(values)
            parts = [site.parts(-500 - i) for i in range(iterations)]
            app.extensions["onprem_label"].engine.dispose()
        finally:
            site.close()
    return verdict(samples, parts)


def verdict(samples: dict[str, list[float]], parts: list[dict[str, float]]) -> int:
    """Print medians, p90s, the parts and the goal verdicts."""
    for key, values in samples.items():
        print(f"{key:<20} median {1000 * c.median(values):7.2f} ms  "
              f"p90 {1000 * percentile(values, 0.9):7.2f} ms"
              f"  min {1000 * min(values):6.2f}  max {1000 * max(values):7.2f}  (n={len(values)})")
    print("parts of an uncached render, each timed alone (medians): " + "; ".join(
        f"{k} {1000 * c.median([p[k] for p in parts]):.2f} ms" for k in parts[0]))
    for key, goal in (("frame_png uncached", UNCACHED_GOAL_MS), ("frame_png cached", CACHED_GOAL_MS)):
        med = 1000 * c.median(samples[key])
        print(f"{key} median {med:.2f} ms; goal <= {goal:g} ms; {med / goal:.2f} x goal -> "
              f"{'PASS' if med <= goal else 'FAIL'}")
    http_un, http_ca = (1000 * c.median(samples[k]) for k in ("HTTP uncached", "HTTP cached"))
    print(f"for reference: over HTTP (test client) uncached {http_un:.2f} ms, cached {http_ca:.2f} ms; "
          f"HTTP - frame_png: {http_un - 1000 * c.median(samples['frame_png uncached']):.2f} ms uncached, "
          f"{http_ca - 1000 * c.median(samples['frame_png cached']):.2f} ms cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())

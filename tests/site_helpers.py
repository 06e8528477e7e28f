"""Test helpers for a real site driven by `serve` subprocesses: people and tasks written straight into its database."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import insert, literal, select

from onprem_label.audit.chain import attach
from onprem_label.audit.site import chain_for
from onprem_label.auth import passwords, tokens
from onprem_label.config import load_settings
from onprem_label.db import make_engine, make_sessionmaker
from onprem_label.db.models import Item, Task, User
from onprem_label.storage import open_keyring


def site_chain(data: Path, database_url: str):
    """The audit chain of the data directory (its keyring seals what the test writes directly)."""
    settings = load_settings({"data_dir": str(data), "database_url": database_url}, env={})
    return chain_for(settings, open_keyring(settings))


def add_people(data: Path, database_url: str, *, labelers: int, reviewers: int,
               token_name: str) -> dict[str, tuple[int, str]]:
    """A manager, `labelers` labelers and `reviewers` reviewers with an API token each: {name: (user id, token)}."""
    now = datetime.now(timezone.utc)
    # One scrypt hash for all (as conftest's make_user does): 19 full-cost hashes would take ~12 s.
    password_hash = passwords.hash_password("people made by the site helpers 7")
    names = [("manager", "manager")] + [(f"labeler{n:02d}", "labeler") for n in range(labelers)] \
        + [(f"reviewer{n}", "reviewer") for n in range(reviewers)]
    engine = make_engine(database_url)
    out = {}
    try:
        maker = make_sessionmaker(engine)
        attach(maker, site_chain(data, database_url))
        with maker() as db:
            for name, role in names:
                user = User(username=name, display_name=name, password_hash=password_hash, roles=role,
                            active=True, must_change_password=False, failed_logins=0, created_at=now,
                            recovery_codes=[], totp_enabled=False)
                db.add(user)
                db.flush()
                out[name] = (user.id, tokens.create_token(db, user, token_name, now=now)[0])
            db.commit()
    finally:
        engine.dispose()
    return out


def add_image_less_tasks(database_url: str, project_id: int, count: int) -> None:
    """`count` image-less items and their new tasks, bulk-inserted (Core, no ORM objects)."""
    now = datetime.now(timezone.utc)
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            row = {"project_id": project_id, "kind": "raster", "width": 64, "height": 64, "frames": 1,
                   "source": "cli", "created_at": now}
            conn.execute(insert(Item), [row] * count)
            conn.execute(insert(Task).from_select(
                ["project_id", "item_id", "state", "round", "version", "active_seconds", "created_at",
                 "updated_at"],
                select(Item.project_id, Item.id, literal("new"), literal(0), literal(1), literal(0),
                       Item.created_at, Item.created_at).where(Item.project_id == project_id)))
    finally:
        engine.dispose()

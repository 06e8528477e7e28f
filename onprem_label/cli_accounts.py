"""CLI groups for accounts and settings: `user ...`, `token ...`, `config show`."""

from __future__ import annotations

import json
from contextlib import contextmanager

import click

from onprem_label.auth import accounts, break_glass, tokens
from onprem_label.clock import utcnow
from onprem_label.config import REGISTRY, ROLES


@contextmanager
def _database(ctx: click.Context):
    """A session on the database at head; commits when the block succeeds."""
    from onprem_label.cli import open_database, settings_from

    root = ctx.find_root()
    engine, make_session = open_database(settings_from(root))
    try:
        with make_session() as db:
            yield db
            db.commit()
    finally:
        engine.dispose()


@click.group("user")
def user_group() -> None:
    """Local accounts."""


@user_group.command("create")
@click.argument("name")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES),
              help="Role to give (repeat for several).")
@click.option("--password", default=None,
              help="Initial password (asked for when omitted; it must be changed at first login).")
@click.option("--display-name", default="", help="Name shown in the interface.")
@click.option("--must-change/--no-must-change", default=True, show_default=True,
              help="Require a password change at first login (turn off only for script accounts "
                   "that use API tokens).")
@click.pass_context
def user_create(ctx, name, roles, password, display_name, must_change) -> None:
    """Create an account."""
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _database(ctx) as db:
        user = accounts.create_user(db, name, password, roles, display_name=display_name,
                                    must_change_password=must_change, now=utcnow())
    click.echo(f"created user {user.username} ({user.roles})")


@user_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def user_list(ctx, as_json: bool) -> None:
    """List accounts with their roles and state."""
    now = utcnow()
    with _database(ctx) as db:
        rows = [{"username": u.username, "roles": sorted(u.role_set), "active": u.active,
                 "locked": bool(u.locked_until and u.locked_until > now),
                 "totp": u.totp_enabled} for u in accounts.list_users(db)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "active" if r["active"] else "disabled"
        state += ", locked" if r["locked"] else ""
        click.echo(f"{r['username']:<24} {' '.join(r['roles']) or '-':<30} {state}")


def _user_action(name: str, help_text: str, verb):
    # help= here, not __doc__ afterwards: click reads the help when the command is made.
    @user_group.command(name, help=help_text)
    @click.argument("username")
    @click.pass_context
    def command(ctx, username):
        with _database(ctx) as db:
            user = accounts.require_user(db, username)
            result = verb(db, user)
        click.echo(result)

    return command


def _end_sessions(db, user) -> str:
    ended, revoked = accounts.end_everywhere(db, user, now=utcnow())
    return f"ended {ended} sessions and revoked {revoked} API tokens of {user.username}"


_user_action("disable", "Disable an account and end its sessions.",
             lambda db, u: (accounts.set_active(db, u, False, now=utcnow()),
                            f"disabled {u.username}; their sessions ended")[1])
_user_action("enable", "Re-enable an account.",
             lambda db, u: (accounts.set_active(db, u, True, now=utcnow()),
                            f"enabled {u.username}")[1])
_user_action("unlock", "Lift a lockout.",
             lambda db, u: (accounts.unlock(db, u, now=utcnow()), f"unlocked {u.username}")[1])
_user_action("reset-password",
             "Set a new one-time password (printed) that must be changed at next login.",
             lambda db, u: "one-time password for {}: {}".format(
                 u.username, accounts.reset_password(db, u, now=utcnow())))
_user_action("end-sessions", "Log a user out everywhere.", _end_sessions)
_user_action("break-glass", "Issue a one-time emergency login code for an admin (audited).",
             lambda db, u: "break-glass code for {} (one use, 1 hour; use at /login/break-glass): {}"
             .format(u.username, break_glass.issue_code(db, u, now=utcnow())))


@click.group("token")
def token_group() -> None:
    """API tokens for scripts."""


@token_group.command("create")
@click.argument("username")
@click.option("--name", "label", default="cli", show_default=True, help="What the token is for.")
@click.pass_context
def token_create(ctx, username, label) -> None:
    """Make a token for USERNAME; the token is printed alone on the last line, once."""
    with _database(ctx) as db:
        user = accounts.require_user(db, username)
        secret, row = tokens.create_token(db, user, label, now=utcnow())
    click.echo(f"token {row.id} for {username} ({label}); it is shown only now:")
    click.echo(secret)


@token_group.command("revoke")
@click.argument("token_id", type=int)
@click.pass_context
def token_revoke(ctx, token_id: int) -> None:
    """Revoke a token by its id."""
    with _database(ctx) as db:
        row = tokens.revoke_token(db, token_id, now=utcnow())
    click.echo(f"revoked token {row.id} ({row.name})")


@token_group.command("list")
@click.argument("username", required=False)
@click.pass_context
def token_list(ctx, username) -> None:
    """List tokens (of one user, or all)."""
    with _database(ctx) as db:
        user = accounts.require_user(db, username) if username else None
        for t in tokens.list_tokens(db, user):
            state = "revoked" if t.revoked_at else "live"
            used = t.last_used_at.isoformat(timespec="seconds") if t.last_used_at else "never"
            click.echo(f"{t.id:>5} {t.user.username:<20} {t.name:<20} {state:<8} last used {used}")


@click.group("config")
def config_group() -> None:
    """Settings."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config_show(ctx, as_json: bool) -> None:
    """Print the effective settings (secrets masked) and where each came from."""
    from onprem_label.cli import settings_from

    settings = settings_from(ctx.find_root())
    shown = settings.masked()
    if as_json:
        click.echo(json.dumps({k: {"value": v, "source": settings.sources[k]}
                               for k, v in shown.items()}, indent=2))
        return
    for setting in REGISTRY:
        click.echo(f"{setting.name} = {json.dumps(shown[setting.name])}    "
                   f"# {settings.sources[setting.name]}")

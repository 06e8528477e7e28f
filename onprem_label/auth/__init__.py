"""Accounts, passwords, login sessions, API tokens, TOTP and roles (no Flask)."""

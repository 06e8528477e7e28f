"""Encrypted storage and key management (no Flask, no database)."""

"""Database layer: models, engine and session setup, migrations."""

from onprem_label.db.base import Base
from onprem_label.db.engine import make_engine, make_sessionmaker

__all__ = ["Base", "make_engine", "make_sessionmaker"]

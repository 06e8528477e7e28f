"""Demo content for a first look: one project with a typical chest X-ray schema."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from onprem_label.db.models import Project

DEMO_SCHEMA = {
    "classes": [
        {"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
        {"name": "effusion", "color": "#3cb44b", "hotkey": "2", "tools": ["polygon", "mask"]},
        {"name": "device", "color": "#4363d8", "hotkey": "3", "tools": ["bbox", "point"]},
    ],
    "questions": [
        {"name": "quality", "type": "single", "options": ["diagnostic", "limited", "non-diagnostic"],
         "required": True},
    ],
}


def create_demo_project(db: Session, *, now: datetime) -> Project:
    """Add the demo project (no images yet: ingest arrives with the imaging issue)."""
    project = Project(name="Demo: chest X-ray findings",
                      description="A sample project to look around in; safe to delete.",
                      label_schema=DEMO_SCHEMA, settings={"review_rate": 1.0}, created_at=now)
    db.add(project)
    return project

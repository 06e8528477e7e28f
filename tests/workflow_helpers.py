"""Test helpers for the workflow: a project with people and items, driven through the HTTP API."""

from __future__ import annotations

import io

from imaging_helpers import bearer_for, make_dicom
from onprem_label.imaging.ingest import IngestTarget, ingest_stream

SCHEMA = {"classes": [{"name": "nodule", "color": "#e6194b", "hotkey": "1", "tools": ["bbox", "polygon"]},
                      {"name": "device", "color": "#4363d8", "hotkey": "2", "tools": ["point"]}],
          "questions": [{"name": "quality", "type": "single", "options": ["good", "poor"], "required": True}]}

BOX = {"type": "bbox", "label": "nodule", "frame": 0, "x": 2, "y": 3, "width": 10, "height": 8}


def ingest_items(app, db, project_id: int, count: int, clock) -> list[int]:
    """`count` small distinct DICOM items in the project (through the core ingest path)."""
    svc, ids = app.extensions["onprem_label"], []
    for n in range(count):
        result = ingest_stream(db, svc.store, IngestTarget(project_id, "cli", actor_name="test"), svc.ingest_options,
                               io.BytesIO(make_dicom(rows=16, columns=16, seed=1000 + n)), f"{n}.dcm", now=clock())
        assert result.status == "imported", result
        ids.append(result.item_id)
    return ids


def team(client, db, make_user, clock, manager_headers: dict, project_id: int, *, labelers: int, reviewers: int):
    """Labelers and reviewers added through the members API; their bearer headers by username."""
    people = {}
    for role, count in (("labeler", labelers), ("reviewer", reviewers)):
        for n in range(1, count + 1):
            name = f"{role}{n}"
            people[name] = bearer_for(db, make_user(name, role), clock)
            response = client.post(f"/api/v1/projects/{project_id}/members", headers=manager_headers,
                                   json={"username": name, "role": role})
            assert response.status_code == 201, response.get_json()
    return people


def lease(client, project_id: int, headers: dict, kind: str = "label"):
    """POST tasks/next; the JSON answer, or None for 204."""
    response = client.post(f"/api/v1/projects/{project_id}/tasks/next", headers=headers, json={"kind": kind})
    assert response.status_code in (200, 204), response.get_json()
    return None if response.status_code == 204 else response.get_json()


def label_and_submit(client, task: dict, headers: dict, shapes=None) -> dict:
    """Save one annotation and submit it; the task after submit."""
    saved = client.put(f"/api/v1/tasks/{task['id']}/annotation", headers=headers,
                       json={"shapes": shapes if shapes is not None else [BOX],
                             "classifications": {"quality": "good"}, "version": task["version"]})
    assert saved.status_code == 200, saved.get_json()
    submitted = client.post(f"/api/v1/tasks/{task['id']}/submit", headers=headers,
                            json={"version": saved.get_json()["task"]["version"]})
    assert submitted.status_code == 200, submitted.get_json()
    return submitted.get_json()["task"]


def label_and_accept_all(client, project_id: int, labeler: dict, reviewer: dict) -> None:
    """The labeler hands in every task they are given, then the reviewer accepts everything waiting."""
    while (got := lease(client, project_id, labeler)) is not None:
        label_and_submit(client, got["task"], labeler)
    while (got := lease(client, project_id, reviewer, "review")) is not None:
        answer = client.post(f"/api/v1/tasks/{got['task']['id']}/review", headers=reviewer,
                             json={"decision": "accept", "version": got["task"]["version"]})
        assert answer.status_code == 200, answer.get_json()

"""Which project an association belongs to: the caller's (AE title, address) on exactly one project's list."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from onprem_label.db.models import Project
from onprem_label.workflow.settings import dicom_callers_problem

# Why an association was refused (audit details and logs; never shown to the caller, who gets
# the A-ASSOCIATE-RJ reason only).
UNKNOWN_CALLER = "unknown_caller"
AMBIGUOUS_CALLER = "ambiguous_caller"


@dataclass(frozen=True)
class Route:
    """Where one caller's instances go: a project id, or a refusal with its reason."""

    project_id: int | None
    refusal: str | None = None


def route_caller(db: Session, ae_title: str, address: str) -> Route:
    """The one project whose dicom_callers list holds this caller; a refusal when none or several do.

    Several matches are refused rather than guessed at: sending a patient's images into the wrong
    project is worse than a refused association, which the PACS reports to its operator.
    """
    matches = [project_id for project_id, callers in _caller_lists(db)
               if any(caller_matches(entry, ae_title, address) for entry in callers)]
    if len(matches) == 1:
        return Route(matches[0])
    return Route(None, UNKNOWN_CALLER if not matches else AMBIGUOUS_CALLER)


def caller_matches(entry: dict, ae_title: str, address: str) -> bool:
    """True when one dicom_callers entry admits this AE title (spaces trimmed) from this IP address."""
    try:
        peer = ipaddress.ip_address(address)
        network = ipaddress.ip_network(entry["address"], strict=True)
    except (ValueError, KeyError, TypeError):
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # a dual-stack socket shows an IPv4 caller as ::ffff:a.b.c.d
    return entry.get("ae_title", "").strip() == ae_title.strip() and peer in network


def _caller_lists(db: Session) -> list[tuple[int, list]]:
    """(project id, its valid dicom_callers) for every project that has any."""
    found = []
    for project_id, settings in db.execute(select(Project.id, Project.settings)).all():
        callers = (settings or {}).get("dicom_callers") or []
        if isinstance(callers, list) and callers and dicom_callers_problem(callers) is None:
            found.append((project_id, callers))
    return found

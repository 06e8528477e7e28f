"""A project's workflow settings: validated on save, read with defaults (docs/quality-and-people.md lists them)."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from onprem_label.db.models import Project
from onprem_label.workflow.errors import Invalid


@dataclass(frozen=True)
class ProjectSettings:
    """Review, leases and escalation; gold, qualification and consensus; promotion; pay."""

    review_rate: float = 1.0
    lease_minutes: int = 30
    max_rounds: int = 3
    stack_series: bool = False
    # Gold and how answers are matched (workflow.metrics).
    hidden_gold_rate: float = 0.05
    iou_threshold: float = 0.5
    dice_threshold: float = 0.5
    point_distance: float = 10.0
    target_accuracy: float = 0.99
    # Qualification: 0 items = no test before live work.
    qualification_items: int = 0
    qualification_pass: float = 0.8
    qualification_retakes: int = 2
    qualification_cooldown_hours: int = 24
    # Consensus: k independent labelers per item (1 = off); spot checks: the share of accepted
    # tasks a second reviewer reviews again, blind (their agreement measures the first reviewer).
    consensus_k: int = 1
    spot_check_rate: float = 0.05
    # Matching (workflow.matching): how many tasks at the head of the queue the lease chooses among
    # (1 = strict queue order), and skills the work needs ("CT", "modality:MR", "class:nodule").
    match_window: int = 16
    required_skills: list = field(default_factory=list)
    # Reviewer promotion and demotion (workflow.promotion).
    promote_min_accepted: int = 200
    promote_first_pass: float = 0.95
    promote_gold_accuracy: float = 0.95
    promote_min_gold: int = 10
    auto_promote: bool = False
    demote_agreement: float = 0.90
    demote_min_reviews: int = 50
    # Pay (workflow.ledger): decimal strings, exact; empty currency = no ledger.
    pay_currency: str = ""
    pay_label_rate: str = "0"
    pay_review_rate: str = "0"
    pay_decimals: int = 2
    pay_gold: bool = False
    pay_minimum_hourly: str = "0"
    # DICOM callers whose C-STOREs land in this project (onprem_label.dicomnet; docs/dicom-receiver.md):
    # [{"ae_title": "PACS1", "address": "10.1.2.3" | "10.1.2.0/24"}].
    dicom_callers: list = field(default_factory=list)


LIMITS = {"review_rate": (0.01, 1.0), "lease_minutes": (1, 24 * 60), "max_rounds": (1, 100),
          "hidden_gold_rate": (0.0, 0.5), "iou_threshold": (0.05, 1.0), "dice_threshold": (0.05, 1.0),
          "point_distance": (0.0, 10_000.0), "target_accuracy": (0.5, 1.0), "qualification_items": (0, 200),
          "qualification_pass": (0.0, 1.0), "qualification_retakes": (0, 100),
          "qualification_cooldown_hours": (0, 24 * 365), "consensus_k": (1, 10), "match_window": (1, 200),
          "spot_check_rate": (0.0, 1.0),
          "promote_min_accepted": (1, 10**7), "promote_first_pass": (0.0, 1.0), "promote_gold_accuracy": (0.0, 1.0),
          "promote_min_gold": (0, 10**6), "demote_agreement": (0.0, 1.0), "demote_min_reviews": (1, 10**7),
          "pay_decimals": (0, 4)}
MONEY = ("pay_label_rate", "pay_review_rate", "pay_minimum_hourly")
MAX_RATE = Decimal("1000000")


MAX_SKILLS = 20
MAX_DICOM_CALLERS = 100
# PS3.5 6.2, VR AE: the default repertoire without backslash and control characters.
AE_TITLE_RE = re.compile(r"[ -\[\]-~]{1,16}")


def _skills_problem(value: list) -> str | None:
    """Why a required_skills list is wrong, or None."""
    if len(value) > MAX_SKILLS or not all(isinstance(s, str) and 0 < len(s) <= 80 and s.strip() == s for s in value):
        return f"up to {MAX_SKILLS} names such as CT, modality:MR or class:nodule"
    if any(":" in s and s.split(":", 1)[0] not in ("modality", "class") for s in value):
        return "a prefix is modality: or class:"
    return None


def dicom_callers_problem(value: list) -> str | None:
    """Why a dicom_callers list is wrong, or None: AE titles of the DICOM charset, IP or CIDR addresses."""
    if len(value) > MAX_DICOM_CALLERS:
        return f"at most {MAX_DICOM_CALLERS} callers"
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"ae_title", "address"}:
            return 'each caller is {"ae_title": "...", "address": "IP or CIDR"}'
        title, address = entry["ae_title"], entry["address"]
        if not isinstance(title, str) or not AE_TITLE_RE.fullmatch(title) or not title.strip():
            return "an AE title is 1 to 16 printable ASCII characters, no backslash"
        try:
            ipaddress.ip_network(address if isinstance(address, str) else "", strict=True)
        except ValueError:
            return "an address is one IP address or a network in CIDR form (10.1.2.0/24), without host bits"
    return None


def _list_problem(key: str, value: list) -> str | None:
    return dicom_callers_problem(value) if key == "dicom_callers" else _skills_problem(value)


def _text_problem(key: str, value: str) -> str | None:
    """Why a text setting's value is wrong, or None."""
    if key == "pay_currency":
        return None if re.fullmatch(r"(|[A-Z]{3})", value) else "an ISO 4217 code such as EUR, or empty"
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return "a decimal number such as 0.40"
    if not amount.is_finite() or not Decimal(0) <= amount <= MAX_RATE or len(value) > 20:
        return f"a decimal from 0 to {MAX_RATE}"
    return None


def validate_settings(raw: Any) -> dict[str, Any]:
    """A complete settings dict from a partial one, or Invalid naming every bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise Invalid("settings must be an object.", errors=[{"field": "settings", "message": "not an object"}])
    problems, values = [], asdict(ProjectSettings())
    for key, value in raw.items():
        if key not in values:
            problems.append({"field": f"settings.{key}", "message": "unknown setting"})
            continue
        expected = type(values[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected or (expected is float and not math.isfinite(value)):
            problems.append({"field": f"settings.{key}", "message": f"expected {expected.__name__}"})
            continue
        low, high = LIMITS.get(key, (None, None))
        if low is not None and not low <= value <= high:
            problems.append({"field": f"settings.{key}", "message": f"must be from {low} to {high}"})
            continue
        if (expected is str and (problem := _text_problem(key, value))) or \
                (expected is list and (problem := _list_problem(key, value))):
            problems.append({"field": f"settings.{key}", "message": problem})
            continue
        values[key] = value
    if problems:
        raise Invalid("Invalid project settings.", errors=problems)
    return values


def project_settings(project: Project) -> ProjectSettings:
    """The project's settings with defaults for anything missing (older projects)."""
    known = {k: v for k, v in (project.settings or {}).items() if k in ProjectSettings.__dataclass_fields__}
    return ProjectSettings(**known)

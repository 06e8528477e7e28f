"""A doctor finding (check, severity, one line of detail) and the exit code findings add up to.

Exit codes follow the monitoring plugin convention (Nagios, Icinga, Zabbix's and Checkmk's
agents read it): 0 every check ok, 1 at least one warning, 2 at least one problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

OK, WARNING, PROBLEM, SKIPPED = "ok", "warning", "problem", "skipped"
# A skipped check adds nothing: the problem that made it skip is a finding of its own.
EXIT_CODES = {OK: 0, SKIPPED: 0, WARNING: 1, PROBLEM: 2}
STATUS_OF_CODE = {0: OK, 1: WARNING, 2: PROBLEM}


@dataclass(frozen=True)
class Finding:
    """What one check found: `severity` is ok, warning, problem or skipped."""

    check: str
    severity: str
    detail: str

    def __post_init__(self) -> None:
        if self.severity not in EXIT_CODES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def line(self) -> str:
        """The finding as one terminal line: severity, check, detail in columns."""
        return f"{self.severity:<8} {self.check:<12} {self.detail}"

    def as_dict(self) -> dict[str, str]:
        """The finding as JSON-able data."""
        return {"check": self.check, "severity": self.severity, "detail": self.detail}


def skipped(check: str, why: str) -> Finding:
    """A check that could not run because an earlier one failed."""
    return Finding(check, SKIPPED, f"skipped: {why}")


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when every finding is ok (or skipped), 1 with a warning, 2 with a problem."""
    return max((EXIT_CODES[f.severity] for f in findings), default=0)


def status(findings: Iterable[Finding]) -> str:
    """ok, warning or problem: the worst severity among the findings."""
    return STATUS_OF_CODE[exit_code(findings)]

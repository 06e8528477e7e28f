"""Health checks behind `onprem-label doctor`: each check returns findings, none of them writes."""

from onprem_label.health.findings import OK, PROBLEM, SKIPPED, WARNING, Finding, exit_code, status

__all__ = ["OK", "PROBLEM", "SKIPPED", "WARNING", "Finding", "exit_code", "status"]

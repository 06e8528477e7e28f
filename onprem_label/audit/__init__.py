"""Audit trail: every security event and data access goes through `record`."""

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import AuditContext, record

__all__ = ["AuditAction", "AuditContext", "record"]

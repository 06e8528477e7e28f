"""The audit chain of one data directory, from its settings: key, checkpoint file, forwarding."""

from __future__ import annotations

from onprem_label.audit.chain import AuditChain, event_dict, make_chain
from onprem_label.config import Settings


def chain_for(settings: Settings, keyring) -> AuditChain:
    """The chain a server or CLI command of `settings` seals its events with."""
    chain = make_chain(keyring, settings.audit_checkpoint_path, settings.audit_checkpoint_every,
                       settings.audit_checkpoint_minutes * 60)
    if settings.audit_syslog_host:
        from onprem_label.audit.syslog import SyslogForwarder

        forwarder = SyslogForwarder(settings.audit_syslog_host, settings.audit_syslog_port,
                                    hostname=settings.audit_source_id)
        chain.after_commit.append(lambda rows: forwarder.send([event_dict(r) for r in rows]))
        chain.forwarder = forwarder
    return chain

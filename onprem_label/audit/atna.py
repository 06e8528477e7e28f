"""Audit events as DICOM audit messages (PS3.15 A.5, the IHE ATNA schema), for an Audit Record Repository.

`audit_message` renders one event as one `<AuditMessage>` document. `write_messages` streams many
into one well-formed XML file: an `<AuditMessages>` root (not part of the DICOM schema) whose
children are schema-shaped `<AuditMessage>` elements, one per line, in event order. A wrapping root
keeps the file parseable by any XML tool (`iterparse` reads it in constant memory); a file cut short
by an error lacks its closing tag, so a truncated export cannot pass for a complete one.

Every message carries the chain fields (id, prev_hash, hash) and request_id as base64
ParticipantObjectDetail pairs on an "audit event" object, so it can be traced to the verified chain.
Values always go through the XML serializer; characters XML 1.0 cannot carry at all (most C0
controls, lone surrogates) become U+FFFD, and user-supplied text is only ever put in attributes
(where CR, LF and TAB survive as character references) or in base64 details.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator

Code = tuple[str, str, str]  # (csd-code, codeSystemName, originalText)

# DICOM's convention: coding scheme designators starting with "99" are private (cf. "99DCM4CHEE").
LOCAL_SCHEME = "99ONPREMLABEL"
PROCESS_NAME = "onprem-label"
OUTCOME_INDICATORS = {"success": "0", "denied": "4", "failure": "8"}


def _dcm(code: str, text: str) -> Code:
    return (code, "DCM", text)


# EventID (CID 400) and EventTypeCode (CID 401) values, PS3.16.
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFER = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
PATIENT_RECORD = _dcm("110110", "Patient Record")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = _dcm("110127", "Emergency Override Started")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")
# RoleIDCode (CID 402).
APPLICATION = _dcm("110150", "Application")
DESTINATION_ROLE = _dcm("110152", "Destination Role ID")
SOURCE_ROLE = _dcm("110153", "Source Role ID")
# ParticipantObjectIDTypeCode.
STUDY_UID = _dcm("110180", "Study Instance UID")
USER_IDENTIFIER = ("11", "RFC-3881", "User Identifier")
URI = ("12", "RFC-3881", "URI")
AUDIT_EVENT_ID = ("audit-event", LOCAL_SCHEME, "onprem-label audit event")


@dataclass(frozen=True)
class _Kind:
    """How one action reads in DICOM terms."""

    event_id: Code
    action_code: str  # EventActionCode: C R U D E
    type_codes: tuple[Code, ...] = ()
    actor_role: Code | None = None  # the standard RoleIDCode the actor plays, if it names one
    node_requests: bool = False  # the server, not the user, started it (a logout timer)


_LOGIN = _Kind(USER_AUTHENTICATION, "E", (LOGIN,))
_READ = _Kind(INSTANCES_ACCESSED, "R")
_IMPORT = _Kind(IMPORT, "C", actor_role=DESTINATION_ROLE)
_EXPORT = _Kind(EXPORT, "R", actor_role=SOURCE_ROLE)
# Labels, reviews and task state are records the server keeps *about* a study; they change no
# DICOM instance, so 110103 (which audits the instances themselves) does not fit. PS3.15 A.5.3.14
# steers records "where specific DICOM SOP Instances are not involved" to Patient Record, with U.
_RECORD_UPDATE = _Kind(PATIENT_RECORD, "U")


def _alert(type_code: Code) -> _Kind:
    """Security Alert: EventActionCode is always E and an EventTypeCode is mandatory (A.5.3.11)."""
    return _Kind(SECURITY_ALERT, "E", (type_code,))


_BY_ACTION = {
    "auth:login": _LOGIN, "auth:login_failed": _LOGIN, "auth:locked": _LOGIN,
    "auth:rate_limited": _LOGIN, "auth:totp_failed": _LOGIN,
    "auth:break_glass_login": _Kind(USER_AUTHENTICATION, "E", (LOGIN, EMERGENCY_OVERRIDE_STARTED)),
    "auth:logout": _Kind(USER_AUTHENTICATION, "E", (LOGOUT,)),
    "auth:session_timeout": _Kind(USER_AUTHENTICATION, "E", (LOGOUT,), node_requests=True),
    "auth:break_glass_issued": _alert(USER_ATTRIBUTES_CHANGED),
    "user:roles": _alert(SECURITY_ROLES_CHANGED),
    "project:member_add": _alert(SECURITY_ROLES_CHANGED),  # membership grants per-project roles
    "project:member_remove": _alert(SECURITY_ROLES_CHANGED),
    "people:decide": _alert(SECURITY_ROLES_CHANGED),  # a confirmed proposal changes a project role
    "pay:statement": _EXPORT,  # statements (pay of named people) leave for payroll
    "image:read": _READ, "item:view": _READ, "task:view": _READ,
    "item:ingest": _IMPORT, "item:duplicate": _IMPORT, "item:reject": _IMPORT,
    "item:pixel_check_clear": _Kind(INSTANCES_ACCESSED, "U"),  # changes the item's release state
    "backup:restore": _IMPORT,
    "import:predictions": _IMPORT,  # a model's output brought in from outside the server
    # The actor of a DICOM association is the calling node, which sends: Source Role ID (A.5.3.4).
    "dicom:association_accept": _Kind(BEGIN_TRANSFER, "E", actor_role=SOURCE_ROLE),
    "dicom:association_end": _Kind(INSTANCES_TRANSFERRED, "C", actor_role=SOURCE_ROLE),
    "dicom:association_refuse": _alert(NODE_AUTHENTICATION),  # an unknown node knocked
}
# Families, for actions without an entry above (new members of a known family land here).
_BY_OBJECT = {
    "auth": _alert(RESTRICTED_FUNCTION),  # access_denied, csrf_rejected: a refused request
    "user": _alert(USER_ATTRIBUTES_CHANGED),
    "token": _alert(USER_ATTRIBUTES_CHANGED),  # a token is a credential of its user
    "project": _alert(SOFTWARE_CONFIGURATION),
    "key": _alert(SECURITY_CONFIGURATION), "system": _alert(SECURITY_CONFIGURATION),
    "settings": _alert(SECURITY_CONFIGURATION),
    "storage": _alert(RESTRICTED_FUNCTION),  # repair tools only an admin may run
    "task": _RECORD_UPDATE, "annotation": _RECORD_UPDATE,
    # Gold references and checks, tests, proposals and pay lines: records kept about the work.
    "gold": _RECORD_UPDATE, "qualification": _RECORD_UPDATE, "people": _RECORD_UPDATE, "pay": _RECORD_UPDATE,
    "item": _READ, "image": _READ,
    "export": _EXPORT,
    "backup": _EXPORT,  # a backup copies the data onto media outside the running system
    "audit": _Kind(AUDIT_LOG_USED, "R"),  # A.5.3.2: search, export and verify all read the log
}
# object_type -> (ParticipantObjectTypeCode, ParticipantObjectTypeCodeRole); A.5.1.2.2, A.5.2.6.
_OBJECT_ROLES = {
    "user": ("1", "11"),  # person, security user entity
    "token": ("2", "13"), "key": ("2", "13"), "settings": ("2", "13"), "system": ("2", "13"),
    "project": ("2", "5"),  # master file: configuration that controls how work is done
    "task": ("2", "20"),  # job
    "item": ("2", "3"), "image": ("2", "3"), "annotation": ("2", "3"), "export": ("2", "3"),
    "backup": ("2", "17"), "storage": ("2", "17"),  # data archive
}
# Characters outside XML 1.0's Char production; no escape can carry them, so they are replaced.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def audit_message(event: dict[str, Any], *, source_id: str, enterprise_site_id: str | None = None) -> bytes:
    """One event as a UTF-8 `<AuditMessage>` XML document (with declaration)."""
    return ET.tostring(_message(event, source_id, enterprise_site_id), encoding="utf-8", xml_declaration=True)


def iter_messages(events: Iterable[dict[str, Any]], *, source_id: str,
                  enterprise_site_id: str | None = None) -> Iterator[bytes]:
    """The `<AuditMessages>` document of `events`, piece by piece (an HTTP response streams it)."""
    yield b"<?xml version='1.0' encoding='utf-8'?>\n<AuditMessages>\n"
    for event in events:
        # Render before writing, so an unrenderable event leaves no half message behind it.
        yield ET.tostring(_message(event, source_id, enterprise_site_id), encoding="utf-8") + b"\n"
    yield b"</AuditMessages>\n"


def write_messages(events: Iterable[dict[str, Any]], out: BinaryIO, *, source_id: str,
                   enterprise_site_id: str | None = None) -> int:
    """Stream events into `out` as one `<AuditMessages>` document; returns how many were written."""
    count = -2  # the opening and closing pieces are not messages
    for piece in iter_messages(events, source_id=source_id, enterprise_site_id=enterprise_site_id):
        out.write(piece)
        count += 1
    return count


def _kind(action: str) -> _Kind:
    if action in _BY_ACTION:
        return _BY_ACTION[action]
    family = action.partition(":")[0]
    if family in _BY_OBJECT:
        return _BY_OBJECT[family]
    # An action this module has never heard of still reaches the repository, flagged as such.
    return _alert((action or "unknown", LOCAL_SCHEME, action or "unknown"))


def _message(event: dict[str, Any], source_id: str, site_id: str | None) -> ET.Element:
    """The `<AuditMessage>` element; children in the schema's order."""
    outcome = event["outcome"]
    if outcome not in OUTCOME_INDICATORS:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    kind = _kind(event["action"])
    root = ET.Element("AuditMessage")
    ident = _el(root, "EventIdentification", EventActionCode=kind.action_code,
                EventDateTime=event["ts"], EventOutcomeIndicator=OUTCOME_INDICATORS[outcome])
    _code(ident, "EventID", kind.event_id)
    for type_code in kind.type_codes:
        _code(ident, "EventTypeCode", type_code)
    if outcome != "success":
        ET.SubElement(ident, "EventOutcomeDescription").text = outcome
    has_actor = bool(event["actor_name"]) or event["actor_id"] is not None
    if has_actor:
        _actor(root, event, kind, source_id)
    _server(root, source_id, requestor=kind.node_requests or not has_actor)
    source = _el(root, "AuditSourceIdentification", AuditSourceID=source_id, AuditEnterpriseSiteID=site_id)
    _code(source, "AuditSourceTypeCode", ("4", "", ""))  # application server process
    _objects(root, event, kind, source_id)
    return root


def _actor(root: ET.Element, event: dict[str, Any], kind: _Kind, source_id: str) -> None:
    """The user the event is about: login name as UserID (what the server's own logs show)."""
    name, actor_id = event["actor_name"], event["actor_id"]
    address, address_type = _access_point(event["client_addr"], source_id)
    part = _el(root, "ActiveParticipant", UserID=name or str(actor_id), UserName=name or None,
               UserIsRequestor="false" if kind.node_requests else "true",
               NetworkAccessPointID=address, NetworkAccessPointTypeCode=address_type)
    if kind.actor_role:
        _code(part, "RoleIDCode", kind.actor_role)
    # The app's RBAC roles are exactly what RoleIDCode is for; they use the local scheme.
    for role in filter(None, (r.strip() for r in event["actor_role"].split(","))):
        _code(part, "RoleIDCode", (role, LOCAL_SCHEME, role))


def _server(root: ET.Element, source_id: str, *, requestor: bool) -> None:
    """The server process: A.5.3 asks for both person and process where both are known."""
    address, address_type = _access_point("console", source_id)
    part = _el(root, "ActiveParticipant", UserID=PROCESS_NAME, UserName=PROCESS_NAME,
               UserIsRequestor="true" if requestor else "false",
               NetworkAccessPointID=address, NetworkAccessPointTypeCode=address_type)
    _code(part, "RoleIDCode", APPLICATION)


def _access_point(client_addr: str, source_id: str) -> tuple[str | None, str | None]:
    """(NetworkAccessPointID, type code): 2 for an IP address, 1 for a machine name."""
    addr = source_id if client_addr == "console" else client_addr  # the console is the server's own
    if not addr:
        return None, None
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return addr, "1"
    return addr, "2"


def _objects(root: ET.Element, event: dict[str, Any], kind: _Kind, source_id: str) -> None:
    """Participant objects: the study, the event's object, the audit log, and the chain record."""
    if event["study_uid"]:
        _object(root, event["study_uid"], "2", "3", STUDY_UID, "DICOM study (de-identified)")
    object_type, object_id = event["object_type"], event["object_id"]
    if kind.event_id == AUDIT_LOG_USED:
        _object(root, f"{PROCESS_NAME}://{source_id}/audit", "2", "13", URI, "Security Audit Log")
    if object_type and object_id and object_type not in ("study", "audit"):
        type_code, role = _OBJECT_ROLES.get(object_type, ("2", None))
        id_type = USER_IDENTIFIER if object_type == "user" else (object_type, LOCAL_SCHEME,
                                                                  f"onprem-label {object_type} id")
        details = []
        if kind.event_id == SECURITY_ALERT:  # A.5.3.11 makes this detail mandatory on the subject
            details.append(("Alert Description", f"{event['action']} {event['outcome']}"))
        _object(root, object_id, type_code, role, id_type, object_type, details)
    _object(root, str(event["id"]), "2", "13", AUDIT_EVENT_ID, "onprem-label audit chain", [
        ("id", str(event["id"])), ("prev_hash", event["prev_hash"]), ("hash", event["hash"]),
        ("request_id", event["request_id"]), ("action", event["action"]),
        ("actor_id", "" if event["actor_id"] is None else str(event["actor_id"])),
        ("user_agent", event["user_agent"]), ("client_addr", event["client_addr"]),
        # ASCII JSON: lossless for any string, and the same bytes every time for the same details.
        ("details", json.dumps(event["details"], sort_keys=True, separators=(",", ":"))),
    ])


def _object(root: ET.Element, object_id: str, type_code: str, role: str | None, id_type: Code,
            name: str, details: Iterable[tuple[str, str]] = ()) -> None:
    """One ParticipantObjectIdentification; details are base64, as the schema's ValuePair requires."""
    obj = _el(root, "ParticipantObjectIdentification", ParticipantObjectID=object_id,
              ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role)
    _code(obj, "ParticipantObjectIDTypeCode", id_type)
    # This copy of the schema makes a name (or a query) mandatory; a fixed label is always safe.
    ET.SubElement(obj, "ParticipantObjectName").text = _xml(name)
    for detail_type, value in details:
        encoded = base64.b64encode(value.encode("utf-8", "replace")).decode("ascii")
        _el(obj, "ParticipantObjectDetail", type=detail_type, value=encoded)


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    """A CodedValueType element: csd-code, codeSystemName and originalText (displayName too)."""
    value, scheme, meaning = code
    return _el(parent, tag, **{"csd-code": value, "codeSystemName": scheme or None,
                               "displayName": meaning or None, "originalText": meaning or None})


def _el(parent: ET.Element, tag: str, **attrs: str | None) -> ET.Element:
    """A child element; None attributes are left out and every value is made XML-safe."""
    return ET.SubElement(parent, tag, {k: _xml(v) for k, v in attrs.items() if v is not None})


def _xml(value: Any) -> str:
    return _NOT_XML_CHAR.sub("\ufffd", str(value))

"""DICOM audit messages (PS3.15 A.5): codes, participants, chain fields, hostile text, streaming."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import pytest

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.atna import LOCAL_SCHEME, audit_message, write_messages

SOURCE = "label01.radiology.example"
STUDY = "2.25.123456789012345678901234567890"
HOSTILE = "<script>&\"'x\r\ny</script>"


def make_event(**changes) -> dict:
    """A complete audit event dict as the chain hands it out; keyword arguments override fields."""
    event = {
        "id": 42, "ts": "2026-12-01T10:48:29.123Z", "actor_id": 7, "actor_name": "alice",
        "actor_role": "annotator,reviewer", "action": "image:read", "object_type": "item",
        "object_id": "991", "study_uid": STUDY, "outcome": "success", "client_addr": "10.1.2.3",
        "user_agent": "Mozilla/5.0", "request_id": "req-7f3a", "details": {"frame": 3},
        "prev_hash": "a" * 64, "hash": "b" * 64,
    }
    event.update(changes)
    return event


def parse(event: dict, **kwargs) -> ET.Element:
    """Render an event and parse it back."""
    root = ET.fromstring(audit_message(event, source_id=SOURCE, **kwargs))
    assert root.tag == "AuditMessage"
    return root


def code(element: ET.Element) -> tuple[str, str, str]:
    """A coded value's (csd-code, codeSystemName, originalText)."""
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def objects(root: ET.Element) -> dict[str, ET.Element]:
    """Participant objects keyed by their ID type's csd-code."""
    return {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o
            for o in root.findall("ParticipantObjectIdentification")}


def chain_details(root: ET.Element) -> dict[str, str]:
    """The decoded ParticipantObjectDetail pairs of the audit-event object."""
    record = objects(root)["audit-event"]
    return {d.get("type"): base64.b64decode(d.get("value"), validate=True).decode("utf-8")
            for d in record.findall("ParticipantObjectDetail")}


def actor(root: ET.Element) -> ET.Element:
    """The ActiveParticipant that is not the server process."""
    (person,) = [p for p in root.findall("ActiveParticipant") if p.get("UserID") != "onprem-label"]
    return person


@pytest.mark.parametrize("action, event_id, text, action_code, type_codes", [
    ("auth:login", "110114", "User Authentication", "E", ["110122"]),
    ("auth:login_failed", "110114", "User Authentication", "E", ["110122"]),
    ("auth:locked", "110114", "User Authentication", "E", ["110122"]),
    ("auth:logout", "110114", "User Authentication", "E", ["110123"]),
    ("auth:session_timeout", "110114", "User Authentication", "E", ["110123"]),
    ("auth:break_glass_login", "110114", "User Authentication", "E", ["110122", "110127"]),
    ("auth:access_denied", "110113", "Security Alert", "E", ["110132"]),
    ("image:read", "110103", "DICOM Instances Accessed", "R", []),
    ("item:view", "110103", "DICOM Instances Accessed", "R", []),
    ("task:view", "110103", "DICOM Instances Accessed", "R", []),
    ("item:ingest", "110107", "Import", "C", []),
    ("export:project", "110106", "Export", "R", []),
    ("backup:create", "110106", "Export", "R", []),
    ("backup:restore", "110107", "Import", "C", []),
    ("audit:search", "110101", "Audit Log Used", "R", []),
    ("audit:export", "110101", "Audit Log Used", "R", []),
    ("audit:verify", "110101", "Audit Log Used", "R", []),
    ("user:create", "110113", "Security Alert", "E", ["110137"]),
    ("user:roles", "110113", "Security Alert", "E", ["110136"]),
    ("project:member_add", "110113", "Security Alert", "E", ["110136"]),
    ("token:create", "110113", "Security Alert", "E", ["110137"]),
    ("project:create", "110113", "Security Alert", "E", ["110131"]),
    ("key:rotate", "110113", "Security Alert", "E", ["110129"]),
    ("system:init", "110113", "Security Alert", "E", ["110129"]),
    ("settings:update", "110113", "Security Alert", "E", ["110129"]),
    ("storage:repair", "110113", "Security Alert", "E", ["110132"]),
    ("annotation:save", "110110", "Patient Record", "U", []),
    ("task:submit", "110110", "Patient Record", "U", []),
    ("task:review", "110110", "Patient Record", "U", []),
    ("dicom:association_accept", "110102", "Begin Transferring DICOM Instances", "E", []),
    ("dicom:association_end", "110104", "DICOM Instances Transferred", "C", []),
    ("dicom:association_refuse", "110113", "Security Alert", "E", ["110126"]),
])
def test_action_maps_to_dicom_event(action, event_id, text, action_code, type_codes):
    """Each action family gets its PS3.15 EventID, EventActionCode and EventTypeCodes, all from DCM."""
    ident = parse(make_event(action=action)).find("EventIdentification")
    assert code(ident.find("EventID")) == (event_id, "DCM", text)
    assert ident.get("EventActionCode") == action_code
    types = ident.findall("EventTypeCode")
    assert [t.get("csd-code") for t in types] == type_codes
    assert all(t.get("codeSystemName") == "DCM" and t.get("originalText") for t in types)


@pytest.mark.parametrize("action", [a.value for a in AuditAction])
def test_every_known_action_has_a_standard_event_id(action):
    """No action in the AuditAction enum falls through to the local-code fallback."""
    ident = parse(make_event(action=action)).find("EventIdentification")
    assert ident.find("EventID").get("codeSystemName") == "DCM"
    assert all(t.get("codeSystemName") == "DCM" for t in ident.findall("EventTypeCode"))


def test_unknown_action_is_a_security_alert_with_a_local_type_code():
    """An action this module does not know still renders, flagged with its own name as a local code."""
    ident = parse(make_event(action="widget:frobnicate")).find("EventIdentification")
    assert code(ident.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert code(ident.find("EventTypeCode")) == ("widget:frobnicate", LOCAL_SCHEME, "widget:frobnicate")


@pytest.mark.parametrize("outcome, indicator", [("success", "0"), ("denied", "4"), ("failure", "8")])
def test_outcome_indicator(outcome, indicator):
    """success, denied and failure become EventOutcomeIndicator 0, 4 (minor) and 8 (serious)."""
    ident = parse(make_event(outcome=outcome)).find("EventIdentification")
    assert ident.get("EventOutcomeIndicator") == indicator
    description = ident.find("EventOutcomeDescription")
    assert (description is None) if outcome == "success" else (description.text == outcome)


def test_unknown_outcome_is_refused():
    """An outcome outside the three the database allows is an error, not a guess."""
    with pytest.raises(ValueError, match="outcome"):
        audit_message(make_event(outcome="maybe"), source_id=SOURCE)


def test_event_date_time_is_the_event_timestamp():
    """EventDateTime is the chain's UTC timestamp, unchanged."""
    ident = parse(make_event()).find("EventIdentification")
    assert ident.get("EventDateTime") == "2026-12-01T10:48:29.123Z"


def test_elements_follow_the_schema_order():
    """EventIdentification, ActiveParticipant+, AuditSourceIdentification, then participant objects."""
    tags = [child.tag for child in parse(make_event())]
    assert tags[0] == "EventIdentification"
    assert tags[1:3] == ["ActiveParticipant", "ActiveParticipant"]
    assert tags[3] == "AuditSourceIdentification"
    assert set(tags[4:]) == {"ParticipantObjectIdentification"}
    for obj in parse(make_event()).findall("ParticipantObjectIdentification"):
        inner = [child.tag for child in obj]
        assert inner[:2] == ["ParticipantObjectIDTypeCode", "ParticipantObjectName"]
        assert set(inner[2:]) <= {"ParticipantObjectDetail"}


def test_actor_is_the_requesting_user_with_ip_access_point():
    """The actor: login name as UserID and UserName, requestor, IP with type 2, app roles as RoleIDCodes."""
    person = actor(parse(make_event()))
    assert person.get("UserID") == "alice"
    assert person.get("UserName") == "alice"
    assert person.get("UserIsRequestor") == "true"
    assert person.get("NetworkAccessPointID") == "10.1.2.3"
    assert person.get("NetworkAccessPointTypeCode") == "2"
    roles = [code(r) for r in person.findall("RoleIDCode")]
    assert roles == [("annotator", LOCAL_SCHEME, "annotator"), ("reviewer", LOCAL_SCHEME, "reviewer")]


def test_server_process_is_a_second_participant_and_the_audit_source():
    """The server appears as an Application participant (not requestor) and as AuditSourceID."""
    root = parse(make_event(), enterprise_site_id="St. Example Radiology")
    (server,) = [p for p in root.findall("ActiveParticipant") if p.get("UserID") == "onprem-label"]
    assert server.get("UserIsRequestor") == "false"
    assert code(server.find("RoleIDCode")) == ("110150", "DCM", "Application")
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == SOURCE
    assert source.get("AuditEnterpriseSiteID") == "St. Example Radiology"
    assert source.find("AuditSourceTypeCode").get("csd-code") == "4"


def test_exactly_one_requestor():
    """PS3.15 allows one UserIsRequestor: the user, or the server when the server acted (timeout)."""
    for action, requestor in (("auth:login", "alice"), ("auth:session_timeout", "onprem-label")):
        root = parse(make_event(action=action))
        assert [p.get("UserID") for p in root.findall("ActiveParticipant")
                if p.get("UserIsRequestor") == "true"] == [requestor]


def test_event_without_actor_has_the_server_as_requestor():
    """A system event (no actor) still has an ActiveParticipant: the server, as requestor."""
    root = parse(make_event(actor_id=None, actor_name="", actor_role="", action="task:lease_expired"))
    (only,) = root.findall("ActiveParticipant")
    assert only.get("UserID") == "onprem-label" and only.get("UserIsRequestor") == "true"


@pytest.mark.parametrize("client_addr, expected_id, type_code", [
    ("10.1.2.3", "10.1.2.3", "2"), ("fd00::17", "fd00::17", "2"),
    ("console", SOURCE, "1"), ("workstation-4", "workstation-4", "1"),
])
def test_network_access_point_type(client_addr, expected_id, type_code):
    """IPs are type 2; the local console is the server's own host name, type 1 (machine name)."""
    person = actor(parse(make_event(client_addr=client_addr)))
    assert person.get("NetworkAccessPointID") == expected_id
    assert person.get("NetworkAccessPointTypeCode") == type_code


def test_failed_login_without_account_names_the_claimed_user():
    """A failed login for an unknown name: UserID is the name claimed, no account id is invented."""
    root = parse(make_event(action="auth:login_failed", actor_id=None, actor_name="mallory",
                            outcome="denied", object_type="", object_id="", study_uid=""))
    assert actor(root).get("UserID") == "mallory"
    assert chain_details(root)["actor_id"] == ""


def test_study_object_carries_the_study_instance_uid():
    """The study: system object (2), report role (3), ID type 110180 Study Instance UID."""
    study = objects(parse(make_event()))["110180"]
    assert study.get("ParticipantObjectID") == STUDY
    assert study.get("ParticipantObjectTypeCode") == "2"
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    assert code(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")


def test_no_study_object_without_a_study():
    """An event with no study_uid has no 110180 object."""
    assert "110180" not in objects(parse(make_event(action="auth:login", study_uid="")))


def test_user_object_is_a_person_with_user_identifier():
    """The subject of user:roles is a person, security user entity, with an Alert Description."""
    root = parse(make_event(action="user:roles", object_type="user", object_id="12", study_uid=""))
    user = objects(root)["11"]
    assert user.get("ParticipantObjectID") == "12"
    assert (user.get("ParticipantObjectTypeCode"), user.get("ParticipantObjectTypeCodeRole")) == ("1", "11")
    assert code(user.find("ParticipantObjectIDTypeCode")) == ("11", "RFC-3881", "User Identifier")
    (alert,) = user.findall("ParticipantObjectDetail")
    assert alert.get("type") == "Alert Description"
    assert base64.b64decode(alert.get("value")) == b"user:roles success"


def test_task_object_is_a_job():
    """A task is a system object in the Job role (20), identified in the local scheme."""
    task = objects(parse(make_event(action="task:submit", object_type="task", object_id="5")))["task"]
    assert (task.get("ParticipantObjectTypeCode"), task.get("ParticipantObjectTypeCodeRole")) == ("2", "20")
    assert code(task.find("ParticipantObjectIDTypeCode"))[1] == LOCAL_SCHEME


def test_audit_log_used_names_the_security_audit_log():
    """Audit Log Used carries the log itself: system object, security resource, URI, fixed name."""
    root = parse(make_event(action="audit:search", object_type="audit", object_id="", study_uid=""))
    log = objects(root)["12"]
    assert (log.get("ParticipantObjectTypeCode"), log.get("ParticipantObjectTypeCodeRole")) == ("2", "13")
    assert code(log.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert log.get("ParticipantObjectID") == f"onprem-label://{SOURCE}/audit"
    assert log.find("ParticipantObjectName").text == "Security Audit Log"


@pytest.mark.parametrize("action, role", [("item:ingest", "110152"), ("export:project", "110153")])
def test_import_and_export_give_the_actor_its_transfer_role(action, role):
    """The importer is the Destination (110152), the exporter the Source (110153)."""
    roles = [r.get("csd-code") for r in actor(parse(make_event(action=action))).findall("RoleIDCode")]
    assert roles[0] == role


def test_chain_fields_are_recoverable():
    """id, prev_hash, hash and request_id come back out of the base64 details, with the rest."""
    event = make_event(details={"z": 1, "a": ["ü", None]}, user_agent="curl/8.5")
    root = parse(event)
    record = objects(root)["audit-event"]
    assert record.get("ParticipantObjectID") == "42"
    details = chain_details(root)
    assert details["id"] == "42"
    assert details["prev_hash"] == "a" * 64
    assert details["hash"] == "b" * 64
    assert details["request_id"] == "req-7f3a"
    assert details["action"] == "image:read"
    assert details["user_agent"] == "curl/8.5"
    assert json.loads(details["details"]) == event["details"]


def test_hostile_user_name_survives_as_data():
    """Markup, quotes and CR/LF in a name stay data: well-formed XML, exact round trip, no raw tag."""
    data = audit_message(make_event(actor_name=HOSTILE, user_agent=HOSTILE, request_id=HOSTILE),
                         source_id=SOURCE)
    assert b"<script>" not in data
    root = ET.fromstring(data)
    assert actor(root).get("UserID") == HOSTILE
    assert actor(root).get("UserName") == HOSTILE
    assert chain_details(root)["user_agent"] == HOSTILE
    assert chain_details(root)["request_id"] == HOSTILE


def test_hostile_values_in_every_field_keep_the_document_well_formed():
    """Hostile text in ids, roles, addresses and the source id cannot break the document."""
    event = make_event(object_id=HOSTILE, study_uid=HOSTILE, actor_role=HOSTILE, client_addr=HOSTILE,
                       object_type="task", action="task:submit")
    root = ET.fromstring(audit_message(event, source_id=HOSTILE, enterprise_site_id=HOSTILE))
    assert objects(root)["110180"].get("ParticipantObjectID") == HOSTILE
    assert objects(root)["task"].get("ParticipantObjectID") == HOSTILE
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == HOSTILE


def test_characters_xml_cannot_carry_are_replaced():
    """NUL, ESC and lone surrogates (illegal in XML 1.0) become U+FFFD instead of breaking the file."""
    name = "a\x00b\x1bc\ud800d"
    root = ET.fromstring(audit_message(make_event(actor_name=name), source_id=SOURCE))
    assert actor(root).get("UserID") == "a\ufffdb\ufffdc\ufffdd"


def test_message_is_utf8_with_declaration():
    """audit_message returns one UTF-8 document that starts with an XML declaration."""
    data = audit_message(make_event(actor_name="Zoë Ångström"), source_id=SOURCE)
    assert data.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    assert "Zoë Ångström".encode("utf-8") in data


def test_write_messages_streams_many_events_into_one_document():
    """A generator of 2,000 events becomes one well-formed document read back in order with iterparse."""
    out = io.BytesIO()
    events = (make_event(id=i, actor_name=f"user{i % 7}", hash=f"{i:064x}") for i in range(1, 2001))
    assert write_messages(events, out, source_id=SOURCE) == 2000
    out.seek(0)
    ids = []
    for _, element in ET.iterparse(out, events=("end",)):
        if element.tag == "AuditMessage":
            ids.append(int(chain_details(element)["id"]))
            element.clear()
    assert ids == list(range(1, 2001))
    out.seek(0)
    assert ET.parse(out).getroot().tag == "AuditMessages"


def test_write_messages_with_no_events_is_an_empty_document():
    """Zero events still give a well-formed, empty <AuditMessages>."""
    out = io.BytesIO()
    assert write_messages([], out, source_id=SOURCE) == 0
    root = ET.fromstring(out.getvalue())
    assert root.tag == "AuditMessages" and len(root) == 0


def test_write_messages_stops_without_closing_the_document_on_a_bad_event():
    """A bad event raises and leaves the file unterminated, so a partial export cannot parse as whole."""
    out = io.BytesIO()
    with pytest.raises(ValueError):
        write_messages([make_event(id=1), make_event(id=2, outcome="bogus")], out, source_id=SOURCE)
    assert out.getvalue().count(b"<AuditMessage>") == 1
    with pytest.raises(ET.ParseError):
        ET.fromstring(out.getvalue())

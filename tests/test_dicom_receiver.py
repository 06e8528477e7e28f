"""The DICOM receiver (`dicom-listen`) against dcmtk's storescu and echoscu on loopback, on both databases."""

from __future__ import annotations

import re
import signal

import pytest

from pydicom.uid import RLELossless

from dicom_net_helpers import (AE_TITLE, CALLER, MARKERS, STUDY, echoscu, listener_process, make_site,
                               receiver_running, send_study, storescu, truncated_instance, wait_for, write_study)
from imaging_helpers import find_markers, make_dicom, raw_files
from onprem_label.dicomnet.receiver import ReceiverConfig, recover_spool
from onprem_label.dicomnet.routing import AMBIGUOUS_CALLER, UNKNOWN_CALLER, caller_matches, route_caller
from onprem_label.dicomnet.spool import Spool
from onprem_label.imaging.prepare import prepare_options
from onprem_label.storage import init_keyring, open_store
from onprem_label.workflow.errors import Invalid
from onprem_label.workflow.settings import validate_settings

# Marks the tests that drive dcmtk: under CI (CI=true) a missing dcmtk fails them, never skips.
dcmtk = pytest.mark.dcmtk
LOOPBACK = [{"ae_title": CALLER, "address": "127.0.0.1"}]


@pytest.fixture
def site(tmp_path, database_url):
    """A keyed data directory at head on the backend under test."""
    return make_site(tmp_path, database_url)


def write_files(folder, files: dict[str, bytes]):
    """`folder` holding `files` (name -> bytes)."""
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def store_responses(site, folder) -> list[str]:
    """The C-STORE statuses storescu reports for a folder sent in one association to an in-process receiver."""
    with receiver_running(site) as port:
        sent = storescu(port, [folder], extra=("-v",))
        assert wait_for(lambda: len(site.events("dicom:association_end")) == 1)
    return re.findall(r"Received Store Response \((.*)\)", sent.stdout + sent.stderr)


# --- through the real CLI ---------------------------------------------------------------------

@dcmtk
def test_storescu_folder_through_cli_becomes_deidentified_encrypted_items(site, tmp_path):
    """Every file storescu sends (two series, a multi-frame, RLE) becomes an item, de-identified and encrypted."""
    project = site.project("Chest CT", LOOPBACK)
    study = write_study(tmp_path / "study")
    with listener_process(site) as (port, process):
        for sent in send_study(port, study):
            assert sent.returncode == 0, sent.stdout + sent.stderr
        assert wait_for(lambda: len(site.events("dicom:association_end")) == study["associations"])
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "dicom-listen: stopped" in out
    assert site.items(project) == study["files"]
    instances = site.stored_instances(project)
    assert sum(int(ds.get("NumberOfFrames", 1)) for ds in instances) == study["frames"]
    assert RLELossless in {ds.file_meta.TransferSyntaxUID for ds in instances}  # stored as it came
    for ds in instances:
        assert ds.PatientIdentityRemoved == "YES"
        assert not ds.StudyInstanceUID.startswith(STUDY) and ds.StudyInstanceUID.startswith("2.25.")
        assert str(ds.get("PatientName", "")) != "Smithfield^Johanna^Q"
    for data in raw_files(site.data).values():  # blobs, spool and database: nothing in clear
        assert find_markers(data, MARKERS) == []
    assert CALLER in err  # logs name the caller, never a patient
    assert find_markers(err.encode(), MARKERS) == []
    ends = site.events("dicom:association_end")
    assert sum(e.details["imported"] for e in ends) == study["files"]
    assert {e.client_addr for e in ends} == {"127.0.0.1"}
    assert len(site.events("item:ingest")) == study["files"]


@dcmtk
def test_unknown_caller_is_refused_at_association_and_audited(site, tmp_path):
    """A calling AE title no project lists gets A-ASSOCIATE-RJ (calling AE not recognized); nothing is stored."""
    project = site.project("Chest CT", LOOPBACK)
    study = write_study(tmp_path / "study")
    with listener_process(site) as (port, _process):
        sent = storescu(port, [study["folder"]], calling="STRANGER")
        echoed = echoscu(port, calling="STRANGER")
    assert sent.returncode != 0 and echoed.returncode != 0
    assert "Calling AE Title Not Recognized" in sent.stdout + sent.stderr
    assert site.items(project) == 0
    refusals = site.events("dicom:association_refuse")
    assert len(refusals) == 1  # the second, within seconds, is counted in the next event (see below)
    assert refusals[0].outcome == "denied" and refusals[0].details["reason"] == UNKNOWN_CALLER
    assert refusals[0].details["calling_ae"] == "STRANGER" and refusals[0].client_addr == "127.0.0.1"
    assert site.events("dicom:association_accept") == []


# --- in-process listener ------------------------------------------------------------------------

@dcmtk
def test_echoscu_gets_success_from_an_allowed_caller(site):
    """C-ECHO from a listed caller succeeds; the association is audited as accepted."""
    site.project("Chest CT", LOOPBACK)
    with receiver_running(site) as port:
        echoed = echoscu(port)
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    assert len(site.events("dicom:association_accept")) == 1


@dcmtk
def test_right_ae_title_from_an_unlisted_address_is_refused(site):
    """The AE title alone is not enough: the caller's address must be on the list too."""
    site.project("Chest CT", [{"ae_title": CALLER, "address": "10.20.30.0/24"}])
    with receiver_running(site) as port:
        echoed = echoscu(port)
    assert echoed.returncode != 0
    assert [e.details["reason"] for e in site.events("dicom:association_refuse")] == [UNKNOWN_CALLER]


@dcmtk
def test_wrong_called_ae_title_is_refused(site):
    """An association addressed to another AE title is refused (called AE not recognized)."""
    site.project("Chest CT", LOOPBACK)
    with receiver_running(site) as port:
        echoed = echoscu(port, called="SOMEONEELSE")
    assert echoed.returncode != 0
    assert "Called AE Title Not Recognized" in echoed.stdout + echoed.stderr
    assert [e.details["reason"] for e in site.events("dicom:association_refuse")] == ["wrong_called_ae"]


@dcmtk
def test_bad_instances_fail_while_the_good_ones_of_the_association_are_stored(site, tmp_path):
    """A truncated instance and a pixel-less SR get failure statuses and are not stored; the rest are."""
    import io

    import pydicom

    project = site.project("Chest CT", LOOPBACK)
    sr = pydicom.dcmread(io.BytesIO(make_dicom(study=STUDY, seed=9)))
    del sr.PixelData
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report = io.BytesIO()
    sr.save_as(report, enforce_file_format=True)
    folder = write_files(tmp_path / "mixed", {"truncated.dcm": truncated_instance(), "report.dcm": report.getvalue(),
                                              **{f"good{n}.dcm": make_dicom(study=STUDY, number=n, seed=n)
                                                 for n in range(3)}})
    responses = store_responses(site, folder)
    expected = ["Error: CannotUnderstand", "Refused: SOPClassNotSupported", *["Success"] * 3]
    assert sorted(responses) == expected, responses
    assert site.items(project) == 3
    codes = sorted(e.details["code"] for e in site.events("item:reject"))
    assert codes == ["no_pixel_data", "truncated"]
    (end,) = site.events("dicom:association_end")
    assert (end.details["imported"], end.details["refused"]) == (3, 2)
    assert Spool(site.data, init_keyring(site.settings())[0], project).pending() == []


@dcmtk
def test_instance_over_the_size_limit_is_refused_out_of_resources(tmp_path, database_url):
    """An instance larger than upload_max_file_bytes gets 0xA700 and is not stored; a small one of the same
    association is."""
    site = make_site(tmp_path, database_url, upload_max_file_bytes=64 * 1024)
    project = site.project("Chest CT", LOOPBACK)
    folder = write_files(tmp_path / "sizes", {"small.dcm": make_dicom(study=STUDY, seed=1),  # 3 KiB, 128 KiB:
                                              "large.dcm": make_dicom(study=STUDY, rows=256, columns=256, seed=2)})
    responses = store_responses(site, folder)
    assert sorted(responses) == ["Refused: OutOfResources", "Success"], responses
    assert site.items(project) == 1
    assert [e.details["code"] for e in site.events("item:reject")] == ["too_large"]


@dcmtk
def test_stop_lets_an_association_in_flight_finish(site, tmp_path):
    """stop() (what SIGTERM and Ctrl+C do) refuses new callers but lets a running association end and stores it all."""
    import threading

    project = site.project("Chest CT", LOOPBACK)
    folder = write_files(tmp_path / "many", {f"{n}.dcm": make_dicom(study=STUDY, rows=256, columns=256, number=n,
                                                                    seed=n) for n in range(40)})
    results = {}
    with receiver_running(site) as port:
        sender = threading.Thread(target=lambda: results.update(sent=storescu(port, [folder])))
        sender.start()
        assert wait_for(lambda: len(site.events("dicom:association_accept")) == 1)
        # leaving the block stops the receiver while storescu is still sending
    sender.join(timeout=120)
    assert results["sent"].returncode == 0, results["sent"].stdout + results["sent"].stderr
    assert site.items(project) == 40


@dcmtk
def test_sending_the_same_study_again_adds_nothing(site, tmp_path):
    """Instances already in the project are answered with success and audited as duplicates, as uploads are."""
    project = site.project("Chest CT", LOOPBACK)
    study = write_study(tmp_path / "study")
    with receiver_running(site) as port:
        for expected in (2, 4):
            assert all(sent.returncode == 0 for sent in send_study(port, study))
            assert wait_for(lambda: len(site.events("dicom:association_end")) == expected)
    assert site.items(project) == study["files"]
    assert len(site.events("item:duplicate")) == study["files"]


@dcmtk
def test_stack_series_project_gets_one_item_per_series(site, tmp_path):
    """With stack_series, the slices of one series arrive as one stack item, as the ingest path does."""
    project = site.project("Stacks", LOOPBACK, stack_series=True)
    study = write_study(tmp_path / "study")
    with receiver_running(site) as port:
        assert all(sent.returncode == 0 for sent in send_study(port, study))
        assert wait_for(lambda: len(site.events("dicom:association_end")) == 2)
    assert site.items(project) == 4  # two stacked series, the multi-frame, the RLE instance
    assert len(site.images(project)) == study["files"]


@dcmtk
def test_two_callers_at_once_each_land_in_their_own_project(site, tmp_path):
    """Two associations at the same time, from two listed callers, fill their two projects and nothing else."""
    import threading

    chest = site.project("Chest CT", LOOPBACK)
    head = site.project("Head CT", [{"ae_title": "MODALITY2", "address": "127.0.0.0/8"}])
    folders = {caller: write_files(tmp_path / caller, {
        f"{n}.dcm": make_dicom(study=f"{STUDY}.{k}", rows=128, columns=128, number=n, seed=100 * k + n)
        for n in range(12)}) for k, caller in enumerate((CALLER, "MODALITY2"))}
    results = {}
    with receiver_running(site, workers=2) as port:
        senders = [threading.Thread(target=lambda c=caller: results.update({c: storescu(port, [folders[c]], calling=c)}))
                   for caller in folders]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
        assert wait_for(lambda: len(site.events("dicom:association_end")) == 2)
    assert all(result.returncode == 0 for result in results.values()), results
    assert (site.items(chest), site.items(head)) == (12, 12)
    routed = {e.details["calling_ae"]: e.object_id for e in site.events("dicom:association_accept")}
    assert routed == {CALLER: str(chest), "MODALITY2": str(head)}


def test_instances_left_in_the_spool_are_stored_at_the_next_start(site):
    """What a crash left in the spool (answered with success, never committed) is ingested by recover_spool."""
    project = site.project("Chest CT", LOOPBACK)
    settings = site.settings()
    keyring = init_keyring(settings)[0]
    spool = Spool(site.data, keyring, project)
    for number in range(2):
        spool.put(make_dicom(study=STUDY, number=number, seed=number))
    from onprem_label.cli import open_database

    engine, maker = open_database(settings)
    try:
        config = ReceiverConfig(AE_TITLE, "127.0.0.1", 0, site.data)
        assert recover_spool(config, maker, open_store(settings, keyring), keyring,
                             prepare_options(settings, keyring)) == 2
    finally:
        engine.dispose()
    assert site.items(project) == 2 and spool.pending() == []


# --- routing and settings -------------------------------------------------------------------------

def test_a_caller_on_two_projects_lists_is_refused_as_ambiguous(site):
    """Routing never guesses: a caller listed by two projects goes nowhere."""
    site.project("A", [{"ae_title": CALLER, "address": "127.0.0.0/8"}])
    site.project("B", LOOPBACK)
    assert site.query(lambda db: route_caller(db, CALLER, "127.0.0.1")).refusal == AMBIGUOUS_CALLER
    assert site.query(lambda db: route_caller(db, CALLER, "127.0.0.2")).project_id is not None


@pytest.mark.parametrize("entry, ae_title, address, matches", [
    ({"ae_title": "PACS", "address": "10.1.2.3"}, "PACS", "10.1.2.3", True),
    ({"ae_title": "PACS", "address": "10.1.2.3"}, "PACS  ", "10.1.2.3", True),  # AE padding is not significant
    ({"ae_title": "PACS", "address": "10.1.2.0/24"}, "PACS", "10.1.2.200", True),
    ({"ae_title": "PACS", "address": "10.1.2.0/24"}, "PACS", "10.1.3.1", False),
    ({"ae_title": "PACS", "address": "10.1.2.3"}, "pacs", "10.1.2.3", False),  # AE titles are case-sensitive
    ({"ae_title": "PACS", "address": "10.1.2.3"}, "PACS", "::ffff:10.1.2.3", True),
    ({"ae_title": "PACS", "address": "fd00::/8"}, "PACS", "fd00::5", True),
])
def test_caller_matching(entry, ae_title, address, matches):
    """An entry admits its AE title from its address or network (IPv4-mapped IPv6 included)."""
    assert caller_matches(entry, ae_title, address) is matches


@pytest.mark.parametrize("callers", [
    [{"ae_title": "", "address": "10.0.0.1"}],
    [{"ae_title": "A" * 17, "address": "10.0.0.1"}],
    [{"ae_title": "BACK\\SLASH", "address": "10.0.0.1"}],
    [{"ae_title": "TAB\tX", "address": "10.0.0.1"}],
    [{"ae_title": "PACS", "address": "pacs.hospital.local"}],
    [{"ae_title": "PACS", "address": "10.0.0.1/24"}],  # host bits set: ambiguous intent
    [{"ae_title": "PACS"}],
    [{"ae_title": "PACS", "address": "10.0.0.1", "port": 104}],
    ["PACS@10.0.0.1"],
])
def test_bad_dicom_callers_are_refused_on_save(callers):
    """dicom_callers entries need an AE title of the DICOM charset (<= 16) and an IP address or CIDR."""
    with pytest.raises(Invalid) as caught:
        validate_settings({"dicom_callers": callers})
    assert caught.value.extra["errors"][0]["field"] == "settings.dicom_callers"


def test_good_dicom_callers_are_kept():
    """A valid list is saved as given."""
    callers = [{"ae_title": "CT SCANNER 2", "address": "10.0.0.0/16"}, {"ae_title": "PACS", "address": "fd00::1"}]
    assert validate_settings({"dicom_callers": callers})["dicom_callers"] == callers


@pytest.mark.parametrize("name, value", [("dicom_ae_title", "X" * 17), ("dicom_ae_title", "A\\B"),
                                         ("dicom_ae_title", "   "), ("dicom_bind", "*"), ("dicom_bind", ""),
                                         ("dicom_port", "0")])
def test_bad_receiver_settings_are_refused(name, value):
    """The receiver's AE title, bind address and port are checked when settings load."""
    from onprem_label.config import SettingsError, load_settings

    with pytest.raises(SettingsError, match=name):
        load_settings({name: value}, env={})



# --- the listening socket's guards (dicomnet/guard.py) -------------------------------------------

def _closed_by_server(sock, within: float) -> bool:
    """True when the server closes `sock` within `within` seconds (recv gives b"" or a reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@dcmtk
def test_a_peer_stalled_inside_a_pdu_is_cut_off_and_the_slot_comes_back(site):
    """Six bytes of a PDU header and then silence: the read times out, the connection closes, echo works."""
    import socket

    site.project("Chest CT", LOOPBACK)
    with receiver_running(site, read_timeout=1.0) as port:
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"\x01\x00\x00\x00\x03\xe8")  # an A-ASSOCIATE-RQ of 1000 bytes, never sent
        assert _closed_by_server(stalled, 15)
        stalled.close()
        assert echoscu(port).returncode == 0


@dcmtk
def test_a_pdu_declared_longer_than_we_accept_is_refused_unread(site):
    """A header declaring a 4 GiB PDU closes the connection at once (no 4 GiB read, no waiting for it)."""
    import socket

    site.project("Chest CT", LOOPBACK)
    with receiver_running(site) as port:  # the default read timeout (65 s) is not what closes it
        greedy = socket.create_connection(("127.0.0.1", port))
        greedy.sendall(b"\x01\x00\xff\xff\xff\x00")
        assert _closed_by_server(greedy, 10)
        greedy.close()
        assert echoscu(port).returncode == 0


def test_connections_past_the_limit_from_one_address_are_closed(site):
    """One address holding PER_ADDRESS connections open gets the next one closed unread."""
    import socket

    from onprem_label.dicomnet.guard import PER_ADDRESS

    site.project("Chest CT", LOOPBACK)
    with receiver_running(site, read_timeout=30.0) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(PER_ADDRESS)]
        try:
            assert wait_for(lambda: not _closed_by_server(held[0], 0.05), 5)
            extra = socket.create_connection(("127.0.0.1", port))
            assert _closed_by_server(extra, 10)
            extra.close()
            assert not any(_closed_by_server(s, 0.05) for s in held)  # the held ones are still open
        finally:
            for s in held:
                s.close()


@dcmtk
def test_a_fault_while_routing_refuses_the_caller_instead_of_accepting_it(site, monkeypatch):
    """pynetdicom accepts when a handler raises: ours refuses (transient) and nothing is accepted."""
    import onprem_label.dicomnet.receiver as receiver_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("database gone")

    site.project("Chest CT", LOOPBACK)
    monkeypatch.setattr(receiver_module, "route_caller", broken)
    with receiver_running(site) as port:
        echoed = echoscu(port)
    assert echoed.returncode != 0
    assert site.events("dicom:association_accept") == []


def test_an_unreadable_instance_in_the_spool_never_stops_the_start(site):
    """A spooled file that no longer prepares (garbage here) is recorded as rejected; the good one lands."""
    project = site.project("Chest CT", LOOPBACK)
    settings = site.settings()
    keyring = init_keyring(settings)[0]
    spool = Spool(site.data, keyring, project)
    spool.put(make_dicom(study=STUDY, number=1, seed=1))
    spool.put(b"this was never DICOM" * 10)
    from onprem_label.cli import open_database

    engine, maker = open_database(settings)
    try:
        config = ReceiverConfig(AE_TITLE, "127.0.0.1", 0, site.data)
        recover_spool(config, maker, open_store(settings, keyring), keyring, prepare_options(settings, keyring))
    finally:
        engine.dispose()
    assert site.items(project) == 1 and spool.pending() == []
    assert len(site.events("item:reject")) == 1


def test_a_spool_file_two_associations_share_stays_until_both_are_done(site):
    """The same bytes from two associations are one spool file (named by content): refusing one copy
    must not take away the other's acknowledged one."""
    from onprem_label.dicomnet.receiver import Receiver

    project = site.project("Chest CT", LOOPBACK)
    settings = site.settings()
    keyring = init_keyring(settings)[0]
    receiver = Receiver(ReceiverConfig(AE_TITLE, "127.0.0.1", 0, site.data), lambda: None,
                        open_store(settings, keyring), keyring, prepare_options(settings, keyring))
    try:
        spool = Spool(site.data, keyring, project)
        data = make_dicom(study=STUDY, seed=3)
        first, second = receiver._spool_put(spool, data), receiver._spool_put(spool, data)
        assert first == second and spool.pending() == [first]
        receiver._spool_discard(spool, second)  # the second association refused its copy
        assert spool.pending() == [first]  # the first one's acknowledged copy is still there
        receiver._spool_discard(spool, first)
        assert spool.pending() == []
    finally:
        receiver.stop()


@dcmtk
def test_a_caller_retrying_without_pause_is_audited_once_a_window_with_a_count(site, monkeypatch):
    """Three refusals in a row are one audit event; the next one after the window counts the two between."""
    import time

    import onprem_label.dicomnet.receiver as receiver_module

    monkeypatch.setattr(receiver_module, "REFUSAL_WINDOW_S", 3.0)
    site.project("Chest CT", LOOPBACK)
    with receiver_running(site) as port:
        started = time.monotonic()
        for _ in range(3):
            assert echoscu(port, calling="STRANGER").returncode != 0
        assert time.monotonic() - started < 3.0, "too slow for the window; the assertions below would not hold"
        assert len(site.events("dicom:association_refuse")) == 1
        time.sleep(3.1)
        assert echoscu(port, calling="STRANGER").returncode != 0
    events = site.events("dicom:association_refuse")
    assert [e.details["refused_since_last_event"] for e in events] == [0, 2]

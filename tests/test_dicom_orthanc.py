"""Orthanc (Debian's package, on loopback ports of its own) pushes a study to `dicom-listen`: it arrives complete."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from debian_packages import ensure_program
from dicom_net_helpers import AE_TITLE, STUDY, free_port, listener_process, make_site, wait_for, write_study
from imaging_helpers import PATIENT_ID

ORTHANC_AE = "ORTHANCTEST"
MODALITY = "labeling"

pytestmark = pytest.mark.orthanc  # under CI (CI=true) a missing Orthanc fails these tests, never skips


@pytest.fixture
def site(tmp_path, database_url):
    """A keyed data directory at head on the backend under test."""
    return make_site(tmp_path, database_url)


@contextmanager
def orthanc(tmp_path: Path, listener_port: int) -> Iterator[str]:
    """Orthanc with its own config (loopback, no remote access, storage in tmp_path); yields its REST URL."""
    program = ensure_program("/usr/sbin/Orthanc", "orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "onprem-label test", "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpServerEnabled": True, "DicomServerEnabled": True, "Plugins": [],
        "DicomModalities": {MODALITY: [AE_TITLE, "127.0.0.1", listener_port]},
        "DicomScuTimeout": 30, "StableAge": 1,
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "w")
    process = subprocess.Popen([program, str(path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        assert wait_for(lambda: _get(url + "/system") is not None or process.poll() is not None, timeout=60)
        assert process.poll() is None, (tmp_path / "orthanc.log").read_text()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())
    except OSError:
        return None


def _post(url: str, body: bytes, content_type: str = "application/dicom"):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def test_orthanc_pushes_a_study_that_arrives_complete(site, tmp_path):
    """POST /instances into Orthanc, then POST /modalities/<name>/store: every instance becomes an item."""
    study = write_study(tmp_path / "study")
    files = sorted(study["folder"].iterdir()) + [study["rle"]]
    project = site.project("From PACS", [{"ae_title": ORTHANC_AE, "address": "127.0.0.1"}])
    with listener_process(site) as (port, _process), orthanc(tmp_path, port) as url:
        uploaded = [_post(url + "/instances", path.read_bytes()) for path in files]
        (study_id,) = {answer["ParentStudy"] for answer in uploaded}
        instances = _get(f"{url}/studies/{study_id}/instances")
        assert len(instances) == study["files"]
        answer = _post(f"{url}/modalities/{MODALITY}/store", study_id.encode(), "text/plain")
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        assert wait_for(lambda: len(site.events("dicom:association_end")) >= 1)
    assert site.items(project) == study["files"]
    assert len(site.images(project)) == len(instances)
    stored = site.stored_instances(project)
    assert sum(int(ds.get("NumberOfFrames", 1)) for ds in stored) == study["frames"]
    assert all(ds.PatientID != PATIENT_ID and not ds.StudyInstanceUID.startswith(STUDY) for ds in stored)
    (accepted,) = site.events("dicom:association_accept")
    assert accepted.details["calling_ae"] == ORTHANC_AE and accepted.client_addr == "127.0.0.1"


def test_orthanc_not_on_the_list_is_refused(site, tmp_path):
    """The same push from an Orthanc no project lists fails in Orthanc and stores nothing."""
    study = write_study(tmp_path / "study")
    project = site.project("From PACS", [{"ae_title": "SOMEPACS", "address": "127.0.0.1"}])
    with listener_process(site) as (port, _process), orthanc(tmp_path, port) as url:
        uploaded = _post(url + "/instances", (study["folder"] / "s1_0.dcm").read_bytes())
        with pytest.raises(urllib.error.HTTPError):
            _post(f"{url}/modalities/{MODALITY}/store", uploaded["ParentStudy"].encode(), "text/plain")
    assert site.items(project) == 0
    (refused,) = site.events("dicom:association_refuse")
    assert refused.details["calling_ae"] == ORTHANC_AE

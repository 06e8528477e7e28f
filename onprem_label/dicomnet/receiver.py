"""The C-STORE and C-ECHO SCP: callers checked at association, instances ingested in batches per association."""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session

from onprem_label.audit.actions import AuditAction
from onprem_label.audit.record import AuditContext, record
from onprem_label.clock import utcnow
from onprem_label.dicomnet.guard import READ_TIMEOUT_S, GuardedServer
from onprem_label.dicomnet.received import prepare_received, warm_up
from onprem_label.dicomnet.routing import route_caller
from onprem_label.dicomnet.spool import Spool, spools_with_leftovers
from onprem_label.imaging import errors
from onprem_label.imaging.batch import StoreBehind
from onprem_label.imaging.errors import Rejected
from onprem_label.imaging.ingest import IngestTarget, store_batch
from onprem_label.imaging.isolation import WorkerPool, prepare_staged
from onprem_label.imaging.prepare import Prepared, PrepareOptions, source_digest
from onprem_label.logs import HIDE_EXCEPTION_TEXT, push_context
from onprem_label.storage import EncryptedBlobStore, Keyring

log = logging.getLogger("onprem_label.dicomnet")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700   # PS3.4 B.2.3: refused, out of resources (also: too large for us)
NOT_SOP_CLASS = 0x0122      # PS3.7 C.4: refused, SOP class not supported (no pixels to label)
MISMATCH = 0xA900           # data set does not match the SOP class
CANNOT_UNDERSTAND = 0xC000  # error: cannot understand (corrupt, undecodable)
STATUS_OF = {errors.TOO_LARGE: OUT_OF_RESOURCES, errors.TOO_MANY_PIXELS: OUT_OF_RESOURCES,
             errors.NO_PIXEL_DATA: NOT_SOP_CLASS, errors.INCOMPATIBLE: MISMATCH}
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected permanent, by the service user, with its reason.
REJECT_PERMANENT, REJECT_TRANSIENT, BY_SERVICE_USER, NO_REASON = 0x01, 0x02, 0x01, 0x01
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07
WRONG_CALLED_AE = "wrong_called_ae"
MAX_PDU = 1 << 20
PDU_SLACK = 64 << 10  # an A-ASSOCIATE-RQ with many contexts, PDV headers around a full P-DATA
BATCH_FILES = 64  # instances per transaction; a 500-slice series is 8 commits, not 500
STORE_ATTEMPTS, STORE_RETRY_S = 3, 2.0
REFUSAL_WINDOW_S, MAX_REFUSAL_KEYS = 10.0, 10_000
ACSE_TIMEOUT_S = 10.0  # pynetdicom's default is 30 s


@dataclass(frozen=True)
class ReceiverConfig:
    """What `dicom-listen` needs besides the database: who we are, where we listen, how we work."""

    ae_title: str
    bind: str
    port: int
    data_dir: Path
    workers: int = 1
    batch_files: int = BATCH_FILES
    actor_name: str = "dicom-listen"
    read_timeout: float = READ_TIMEOUT_S


@dataclass
class _Association:
    """One accepted association: its caller, project, spool, storer and counts."""

    caller: str
    address: str
    project_id: int
    spool: Spool
    db: Session
    storer: StoreBehind | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"imported": 0, "duplicate": 0, "rejected": 0})
    refused: int = 0  # answered with a failure status
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False


class Receiver:
    """A pynetdicom AE whose handlers route callers to projects and ingest what they send."""

    def __init__(self, config: ReceiverConfig, make_session: Callable[[], Session], store: EncryptedBlobStore,
                 keyring: Keyring, options: PrepareOptions, *, link_key: bytes | None = None):
        self.config, self._make_session, self._store = config, make_session, store
        self._keyring, self._options, self._link_key = keyring, options, link_key
        self._pool = WorkerPool(config.workers)
        self._sealer = ThreadPoolExecutor(4, thread_name_prefix="dicom-spool")  # one per association at a time
        self._routes: dict[int, tuple[int, str, str]] = {}  # id(assoc) -> (project, caller, address)
        self._open: dict[int, _Association] = {}
        self._spooled: Counter = Counter()  # (project, spool id) -> associations holding it
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}  # (address, reason) -> (audited at, since)
        self.refusal_window = REFUSAL_WINDOW_S
        self._lock = threading.Lock()
        self._server = None
        self.ae = self._make_ae()

    # -- running -------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = False  # checked in _on_requested, so the refusal is audited too
        # Larger PDUs than the 16 KiB default mean fewer reads in pynetdicom's Python loop. This is only
        # what we advertise: the guarded server (guard.py) refuses a PDU declared longer than it.
        ae.maximum_pdu_size = MAX_PDU
        ae.maximum_associations = 16
        # How long an association waits for the peer's A-ASSOCIATE-RQ (and other ACSE answers); a
        # connection cut by guard.py holds its slot this long. Peers answer in milliseconds.
        ae.acse_timeout = ACSE_TIMEOUT_S
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> int:
        """Listen (in background threads); returns the port actually bound."""
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_RELEASED, self._on_end), (evt.EVT_ABORTED, self._on_end),
                    (evt.EVT_CONN_CLOSE, self._on_end)]
        self._server = self.ae.make_server((self.config.bind, self.config.port), evt_handlers=handlers,
                                           server_class=self._server_class())
        # As AE.start_server does for its own servers (the server's shutdown() takes itself off the list).
        self.ae._servers.append(self._server)
        threading.Thread(target=self._server.serve_forever, name="dicom-listen", daemon=True).start()
        for _ in range(self._pool.workers):  # spawn the workers now, not during a caller's first C-STORE
            self._pool.submit(warm_up)
        return self._server.server_address[1]

    def _server_class(self) -> type[GuardedServer]:
        """The guarded server with this receiver's limits (guard.py says why)."""
        return type("Server", (GuardedServer,), {"max_pdu": MAX_PDU + PDU_SLACK,
                                                 "read_timeout": self.config.read_timeout})

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop listening, let open associations finish (up to `grace_seconds`), store what they sent."""
        if self._server is not None:
            self._server.shutdown()  # no new association; the running ones go on
            waited = 0.0
            while self._server_associations() and waited < grace_seconds:
                threading.Event().wait(0.1)
                waited += 0.1
            for assoc in self._server_associations():
                assoc.abort()  # EVT_ABORTED stores what it had sent
            self._server = None
        for state in list(self._open.values()):
            self._finish(state)
        self._pool.close()
        self._sealer.shutdown()

    def _server_associations(self) -> list:
        return [a for a in self.ae.active_associations if a.is_alive()]

    # -- association ---------------------------------------------------------------------------

    def _on_requested(self, event) -> None:
        """Route the caller; refuse (A-ASSOCIATE-RJ, audited) a wrong called AE or an unknown caller.

        pynetdicom accepts an association whose handler raised, so nothing may escape from here: a
        fault while routing (the database busy or gone) refuses the caller for now instead.
        """
        # pynetdicom runs each association in a thread of its own, which ends with it: its records
        # carry one id from the request to the end, so an operator can follow one caller's session.
        push_context(association=uuid.uuid4().hex[:16])
        try:
            self._route(event.assoc)
        except Exception:  # noqa: BLE001 - fail closed, and say why in the log
            log.exception("could not check the caller of an association; refused for now")
            with self._lock:
                self._routes.pop(id(event.assoc), None)
            event.assoc.acse.send_reject(REJECT_TRANSIENT, BY_SERVICE_USER, NO_REASON)
            event.assoc.kill()

    def _route(self, assoc) -> None:
        """Accept (remember the project) or refuse one association request; see _on_requested."""
        caller = _text(assoc.requestor.primitive.calling_ae_title)
        called = _text(assoc.requestor.primitive.called_ae_title)
        address = assoc.requestor.address
        with self._make_session() as db:
            if called != self.config.ae_title.strip():
                reason, diagnostic = WRONG_CALLED_AE, CALLED_AE_NOT_RECOGNIZED
            else:
                route = route_caller(db, caller, address)
                db.rollback()
                if route.project_id is not None:
                    with self._lock:
                        self._routes[id(assoc)] = (route.project_id, caller, address)
                    return
                reason, diagnostic = route.refusal, CALLING_AE_NOT_RECOGNIZED
            # Audited before the answer leaves (the caller may look, or give up, at once); a caller
            # retrying without pause is audited once per REFUSAL_WINDOW_S, the next event counting
            # the refusals in between, so it cannot fill the trail (or the log) at wire speed.
            repeats = self._refusal_repeats(address, reason)
            if repeats is not None:
                record(db, AuditAction.DICOM_ASSOCIATION_REFUSE, actor_name=f"dicom:{caller}", object_type="dicom",
                       outcome="denied", details={"reason": reason, "calling_ae": caller, "called_ae": called,
                                                  "refused_since_last_event": repeats},
                       context=AuditContext(client_addr=address), now=utcnow())
                db.commit()
            assoc.acse.send_reject(REJECT_PERMANENT, BY_SERVICE_USER, diagnostic)
            assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom's own refusals do
        if repeats is not None:
            log.warning("refused association from AE %r at %s (called %r): %s%s", caller, address, called, reason,
                        f" ({repeats} more since the last report)" if repeats else "")

    def _refusal_repeats(self, address: str, reason: str) -> int | None:
        """How many refusals of (address, reason) went unrecorded since the last recorded one, when this
        one is to be recorded; None when it falls inside the window and is only counted."""
        now, key = time.monotonic(), (address, reason)
        with self._lock:
            last, count = self._refusals.get(key, (None, 0))
            if last is not None and now - last < self.refusal_window:
                self._refusals[key] = (last, count + 1)
                return None
            self._refusals[key] = (now, 0)
            if len(self._refusals) > MAX_REFUSAL_KEYS:  # a sweep of many addresses: forget the oldest
                oldest = min(self._refusals, key=lambda k: self._refusals[k][0])
                del self._refusals[oldest]
            return count

    def _on_accepted(self, event) -> None:
        """Open the association's session, spool and storer; audit that it began."""
        assoc = event.assoc
        with self._lock:
            project_id, caller, address = self._routes.pop(id(assoc))
        state = _Association(caller, address, project_id, Spool(self.config.data_dir, self._keyring, project_id),
                             self._make_session())
        state.storer = StoreBehind(lambda group: self._store_group(state, group),
                                   max_files=self.config.batch_files)
        with self._lock:
            self._open[id(assoc)] = state
        record(state.db, AuditAction.DICOM_ASSOCIATION_ACCEPT, actor_name=f"dicom:{caller}", object_type="project",
               object_id=project_id, details={"calling_ae": caller, "called_ae": self.config.ae_title},
               context=AuditContext(client_addr=address), now=utcnow())
        state.db.commit()
        log.info("association from AE %r at %s accepted for project %s", caller, address, project_id)

    def _on_end(self, event) -> None:
        """Released, aborted or closed: store what the association sent and audit its counts."""
        with self._lock:
            state = self._open.pop(id(event.assoc), None)
            self._routes.pop(id(event.assoc), None)
        if state is not None:
            self._finish(state)

    def _finish(self, state: _Association) -> None:
        with state.lock:
            if state.ended:
                return
            state.ended = True
        try:
            state.storer.close()
        except Exception:  # noqa: BLE001 - the instances stay in the spool for the next start
            log.exception("storing the last batch of AE %r failed; its instances stay in the spool", state.caller,
                          extra=HIDE_EXCEPTION_TEXT)  # a database error's text may quote a stored value
            state.db.rollback()
        record(state.db, AuditAction.DICOM_ASSOCIATION_END, actor_name=f"dicom:{state.caller}", object_type="project",
               object_id=state.project_id, details={**state.counts, "refused": state.refused,
                                                    "calling_ae": state.caller},
               context=AuditContext(client_addr=state.address), now=utcnow())
        state.db.commit()
        state.db.close()
        log.info("association from AE %r ended: %d imported, %d duplicates, %d rejected", state.caller,
                 state.counts["imported"], state.counts["duplicate"], state.counts["rejected"])

    # -- services ------------------------------------------------------------------------------

    def _on_echo(self, event) -> int:
        """C-ECHO: success on an association we accepted (and opened); a failure otherwise."""
        return SUCCESS if id(event.assoc) in self._open else CANNOT_UNDERSTAND

    def _on_store(self, event) -> Any:
        """Answer success once the instance is prepared and sealed in the spool; a failure otherwise."""
        state = self._open.get(id(event.assoc))
        if state is None or state.ended:
            return _status(OUT_OF_RESOURCES, "the association is closing")
        try:
            outcome, spooled = self._receive(state, event.encoded_dataset())
            state.storer(_Received(spooled), outcome)  # raises when an earlier batch failed
        except Exception:  # noqa: BLE001 - a disk or database fault: refuse, never acknowledge
            # Its text could quote the instance (a value that failed to parse): type and frames only.
            log.exception("could not take an instance from AE %r", state.caller, extra=HIDE_EXCEPTION_TEXT)
            return _status(OUT_OF_RESOURCES, "the receiver could not store the instance")
        if isinstance(outcome, Rejected):
            state.refused += 1
            return _status(STATUS_OF.get(outcome.code, CANNOT_UNDERSTAND), outcome.reason)
        return SUCCESS

    def _receive(self, state: _Association, data: bytes) -> tuple[Prepared | Rejected, str | None]:
        """(prepared or rejected, spool id); the copy is sealed in the spool while the instance is prepared."""
        try:
            digest = source_digest(io.BytesIO(data), self._options.digest_key, self._options.max_bytes)
        except Rejected as exc:
            return exc, None
        # Sealing the copy (encrypt, fsync) and decoding it in a worker overlap: neither waits for the other.
        sealing = self._sealer.submit(self._spool_put, state.spool, data)
        # Every instance is decoded in an isolated worker (memory and time limits, docs/ingest-and-
        # deidentification.md), uncompressed ones too: a data set may carry its own file meta that
        # names another transfer syntax than the one negotiated, and even plain pixels and sequences
        # can be made to cost gigabytes. (Preparing native ones here was 30% faster; bench X-R.)
        try:
            outcome = self._pool.run(prepare_received, data, self._options, digest)
        except Rejected as exc:  # it crashed its worker twice
            outcome = exc
        spooled = sealing.result()
        if isinstance(outcome, Rejected):
            self._spool_discard(state.spool, spooled)  # answered with a failure: the caller still has it
            return outcome, None
        return outcome, spooled

    # Spool entries are named by their content (the blob store's keyed hash): two associations that
    # receive the same bytes share one file, so it goes only when the last of them is done with it.
    def _spool_put(self, spool: Spool, data: bytes) -> str:
        spooled = spool.put(data)
        with self._lock:
            if not spool.store.exists(spooled):  # its last holder took it out between our put and here
                spooled = spool.put(data)
            self._spooled[(spool.project_id, spooled)] += 1
        return spooled

    def _spool_discard(self, spool: Spool, spooled: str) -> None:
        with self._lock:
            key = (spool.project_id, spooled)
            self._spooled[key] -= 1
            if self._spooled[key] > 0:
                return
            del self._spooled[key]
            spool.discard(spooled)  # under the lock: a put of the same bytes waits, then writes anew

    def _store_group(self, state: _Association, group: list) -> None:
        """One transaction for a group of instances (imaging.ingest.store_batch), then out of the spool.

        A failed transaction (the database busy past its timeout, a lost connection) is rolled back and
        tried again after a pause: these instances were acknowledged, so giving up means the spool
        keeps them until the next start.
        """
        target = IngestTarget(state.project_id, "dicom", actor_name=f"dicom:{state.caller}",
                              context=AuditContext(client_addr=state.address), link_key=self._link_key)
        files = [(f"{state.caller}#{n}", outcome) for n, (_, outcome) in enumerate(group)]
        for attempt in range(STORE_ATTEMPTS):
            try:
                results = store_batch(state.db, self._store, target, files, now=utcnow())
                break
            except Exception:  # noqa: BLE001 - retried, then raised for StoreBehind to report
                state.db.rollback()
                if attempt == STORE_ATTEMPTS - 1:
                    raise
                log.warning("storing %d instances of AE %r failed; trying again", len(files), state.caller,
                            exc_info=True, extra=HIDE_EXCEPTION_TEXT)
                threading.Event().wait(STORE_RETRY_S * (attempt + 1))
        for received, _ in group:
            if received.spool_id is not None:
                self._spool_discard(state.spool, received.spool_id)
        for result in results:
            state.counts[result.status] += 1


@dataclass(frozen=True)
class _Received:
    """StoreBehind's `source` for an instance: where it waits in the spool (None: nothing spooled)."""

    spool_id: str | None


def recover_spool(config: ReceiverConfig, make_session: Callable[[], Session], store: EncryptedBlobStore,
                  keyring: Keyring, options: PrepareOptions, *, link_key: bytes | None = None) -> int:
    """Ingest what a crash left in the spools (acknowledged, never stored); how many instances."""
    total = 0
    pool = WorkerPool(config.workers)
    try:
        for spool in spools_with_leftovers(config.data_dir, keyring):
            target = IngestTarget(spool.project_id, "dicom", actor_name=f"{config.actor_name} (recovered)",
                                  link_key=link_key)
            ids = spool.pending()
            files = []
            for n, blob_id in enumerate(ids):
                try:
                    with spool.store.open(blob_id) as stream:
                        digest = source_digest(stream, options.digest_key, options.max_bytes)
                    outcome = pool.run(prepare_staged, str(spool.root), keyring, blob_id, options, digest)
                except Rejected as exc:  # too large by today's limit, or it crashes its worker: recorded below
                    outcome = exc
                except Exception:  # noqa: BLE001 - unreadable: kept for an operator, never a start loop
                    log.exception("spool of project %s: instance %s cannot be read; kept", spool.project_id,
                                  blob_id, extra=HIDE_EXCEPTION_TEXT)
                    continue
                files.append((blob_id, f"spool#{n}", outcome))
            with make_session() as db:
                try:
                    store_batch(db, store, target, [(name, outcome) for _, name, outcome in files], now=utcnow())
                except LookupError:  # the project is gone: keep the instances for an operator
                    log.error("spool of project %s: the project no longer exists; %d instances kept",
                              spool.project_id, len(ids))
                    continue
            ids = [blob_id for blob_id, _, _ in files]  # a rejected one is recorded by store_batch as such
            for blob_id in ids:
                spool.discard(blob_id)
            total += len(ids)
            log.info("recovered %d instances from the spool of project %s", len(ids), spool.project_id)
    finally:
        pool.close()
    return total


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: 64 characters; our reasons quote no value)."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _text(value: Any) -> str:
    """An AE title as sent (pynetdicom 2+ gives str; older gave bytes), spaces trimmed."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


# Every transfer syntax our decoders read (docs/ingest-and-deidentification.md); storescu and PACS
# propose the one each file has, and a compressed file stays compressed.
ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
]

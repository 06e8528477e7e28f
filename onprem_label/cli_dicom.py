"""CLI for the DICOM receiver: `dicom-listen` (C-STORE and C-ECHO SCP)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click


@click.command("dicom-listen")
@click.option("--ae-title", default=None, help="Our AE title (default: the dicom_ae_title setting).")
@click.option("--bind", default=None,
              help="Address to listen on. Default 127.0.0.1 (dicom_bind): DICOM travels in clear, so the "
                   "receiver is opened to the LAN only on purpose, once projects list their callers.")
@click.option("--port", type=int, default=None, help="TCP port (default: the dicom_port setting, 11112).")
@click.option("--workers", type=int, default=None,
              help="Processes that decode and de-identify (default: the ingest_workers setting).")
@click.pass_context
def dicom_listen(ctx, ae_title: str | None, bind: str | None, port: int | None, workers: int | None) -> None:
    """Receive DICOM instances (C-STORE) from the callers each project allows, and answer C-ECHO."""
    from onprem_label.cli import (CliError, _check_port_free, ask_passphrase, open_database, settings_from,
                                  start_logging)
    from onprem_label.dicomnet.receiver import Receiver, ReceiverConfig, recover_spool
    from onprem_label.imaging.prepare import link_key, prepare_options
    from onprem_label.storage import open_keyring, open_store

    settings = settings_from(ctx.find_root(), dicom_ae_title=ae_title, dicom_bind=bind, dicom_port=port)
    # pynetdicom logs every PDU at INFO and, at DEBUG, the original SOP Instance UID of every C-STORE
    # (an identifier that must not reach a log): logs.ALWAYS_QUIET keeps it at WARNING whatever log_level is.
    start_logging(settings, "dicom-listen")
    workers = workers if workers is not None else settings.ingest_workers or os.cpu_count() or 1
    if workers < 1:
        raise CliError("--workers must be at least 1")
    keyring = open_keyring(settings, passphrase=ask_passphrase(settings))
    store, options = open_store(settings, keyring), prepare_options(settings, keyring)
    engine, make_session = open_database(settings)
    config = ReceiverConfig(settings.dicom_ae_title.strip(), settings.dicom_bind, settings.dicom_port,
                            settings.data_path, workers=workers)
    try:
        recovered = recover_spool(config, make_session, store, keyring, options, link_key=link_key(settings, keyring))
        if recovered:
            click.echo(f"dicom-listen: stored {recovered} instances a previous run had acknowledged", err=True)
        _check_port_free(config.bind, config.port)
        receiver = Receiver(config, make_session, store, keyring, options, link_key=link_key(settings, keyring))
        stop = threading.Event()
        # systemd stops services with SIGTERM; both signals end the loop the same way.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        bound = receiver.start()
        click.echo(f"dicom-listen: AE {config.ae_title} on {config.bind}:{bound} "
                   f"(data {settings.data_path}); Ctrl+C stops")
        sys.stdout.flush()
        log = logging.getLogger("onprem_label.dicomnet")
        log.info("listening as AE %s on %s:%s with %d workers", config.ae_title, config.bind, bound, workers)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            receiver.stop()
        click.echo("dicom-listen: stopped")
        log.info("stopped")
    finally:
        engine.dispose()

"""sd_notify: a real `mailward run` tells a NOTIFY_SOCKET (as systemd would) when it is ready,
reloading and stopping, in that order, and READY=1 only once the milter socket accepts."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from mailward.lab.postfix import MailwardProcess
from mailward.services.sdnotify import Notifier

CONFIG = ("[milter]\nsocket = {socket}\nauthserv_id = mx.example.com\n"
          "[policy]\nchecks = bcc\n")


def _receive(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(15)  # a deadline for waiting only
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_reloading_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        mailward = MailwardProcess(CONFIG, tmp_path / "mw", port=0,
                                   env={"NOTIFY_SOCKET": address})
        mailward.write()
        mailward.start()
        try:
            ready = _receive(listener)
            assert ready["READY"] == "1", ready
            # READY=1 came after the socket was open: it accepts a connection now
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(mailward.socket_path))
            assert mailward.proc is not None
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            mailward.proc.send_signal(signal.SIGUSR1)
            reloading = _receive(listener)
            assert reloading["RELOADING"] == "1", reloading
            assert int(reloading["MONOTONIC_USEC"]) >= before
            assert _receive(listener)["READY"] == "1"
            assert mailward.stop() == 0
            assert _receive(listener)["STOPPING"] == "1"
        finally:
            mailward.stop()


def test_abstract_address_and_no_socket(tmp_path: Path) -> None:
    name = f"mailward-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert _receive(listener)["STOPPING"] == "1"
    Notifier({}).ready()  # not under systemd: nothing to do, nothing raised
    assert not Notifier({}).enabled
    # a socket gone away is logged, not raised: mailward keeps serving
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()

"""The watchdog: WATCHDOG=1 follows a completed milter option negotiation, never a silent or
absent milter (so systemd restarts a hung mailward)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mailward.lab.postfix import MailwardProcess
from mailward.services import watchdog
from mailward.services.sdnotify import Notifier

CONFIG = ("[milter]\nsocket = {socket}\nauthserv_id = mx.example.com\n"
          "[policy]\nchecks = bcc\n")


def _receive(sock: socket.socket) -> str:
    sock.settimeout(15)  # a deadline for waiting only
    return sock.recv(4096).decode()


@pytest.mark.parametrize("port", [0, None])
def test_real_mailward_answers_and_pings(tmp_path: Path, port: int | None) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
        mailward = (MailwardProcess(CONFIG, tmp_path / "mw", port=0, env=env) if port == 0
                    else MailwardProcess(CONFIG, tmp_path / "mw", env=env))
        mailward.start()
        try:
            assert watchdog.probe(mailward.milter_socket, timeout=5)
            assert _receive(listener).startswith("READY=1")
            assert _receive(listener) == "WATCHDOG=1"
            assert _receive(listener) == "WATCHDOG=1"
        finally:
            mailward.stop()
        assert "Traceback" not in mailward.log()


def test_watchdog_pid_of_another_process_is_not_ours() -> None:
    assert watchdog.interval({"WATCHDOG_USEC": "4000000"}) == 4.0
    assert watchdog.interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog.interval({"WATCHDOG_USEC": "4000000",
                              "WATCHDOG_PID": str(os.getpid())}) == 4.0
    assert watchdog.interval({}) is None


def test_hung_milter_gets_no_ping(tmp_path: Path) -> None:
    """A milter that accepts but never answers: probes time out, no WATCHDOG=1 is sent."""
    path = tmp_path / "hung.sock"
    notify = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        hung.bind(str(path))
        hung.listen(8)
        listener.bind(notify)
        stop = watchdog.start(f"unix:{path}", Notifier({"NOTIFY_SOCKET": notify}), 0.4)
        try:
            hung.settimeout(15)  # a deadline for waiting only
            first, _ = hung.accept()
            second, _ = hung.accept()  # the first probe has ended: its outcome is decided
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.recv(4096)
            first.close()
            second.close()
        finally:
            stop.set()
    assert not watchdog.probe(f"unix:{tmp_path / 'absent.sock'}", timeout=1)

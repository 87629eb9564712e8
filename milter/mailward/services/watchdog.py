"""systemd's watchdog (`WatchdogSec=`): WATCHDOG=1 only while the milter really answers.

Under a unit with `WatchdogSec=`, systemd sets $WATCHDOG_USEC (and $WATCHDOG_PID). A thread
probes mailward's own milter socket every quarter period, as an MTA would begin: it sends the
option negotiation (SMFIC_OPTNEG, milter protocol version 6) and waits, at most a quarter period,
for libmilter's SMFIC_OPTNEG answer, then says SMFIC_QUIT. Only a complete answer sends
WATCHDOG=1; a hung or dead milter sends nothing, so systemd kills and restarts it. The probe
never reaches mailward's callbacks (they begin at SMFIC_CONNECT): no message, no metric.

A milter packet (libmilter's mfdef.h): a 4-byte big-endian length, then the command byte and
its data; OPTNEG's data is three 32-bit words: version, actions, protocol steps.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

from mailward.services.sdnotify import Notifier

log = logging.getLogger(__name__)

OPTNEG = b"O"
QUIT = b"Q"
VERSION = 6
# the actions (SMFIF_*) and protocol steps (SMFIP_*) a Postfix 3.x would offer
ACTIONS = 0x1FF
STEPS = 0x1FFFFF


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(command) + len(data)) + command + data


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("milter closed the connection")
        data += chunk
    return data


def _connect(address: str, timeout: float) -> socket.socket:
    """Connect to a milter socket in libmilter's syntax: unix:PATH, local:PATH, inet:PORT@HOST,
    inet6:PORT@HOST."""
    kind, _, rest = address.partition(":")
    if kind in ("unix", "local"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = rest
    else:
        port, _, host = rest.partition("@")
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        default = "::1" if kind == "inet6" else "127.0.0.1"
        target = (host.strip("[]") or default, int(port))
        if target[0] in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listener: reach it on loopback
            target = (default, target[1])
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def probe(address: str, *, timeout: float) -> bool:
    """True when the milter at `address` completes an option negotiation within `timeout`."""
    try:
        with _connect(address, timeout) as sock:
            sock.sendall(packet(OPTNEG, struct.pack(">III", VERSION, ACTIONS, STEPS)))
            (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
            answer = _recv_exactly(sock, min(length, 4096))
            sock.sendall(packet(QUIT))
    except (OSError, ValueError, struct.error) as exc:
        log.warning("watchdog: milter socket %s did not answer: %s", address, exc)
        return False
    if answer[:1] != OPTNEG:
        log.warning("watchdog: milter socket %s answered %r to SMFIC_OPTNEG", address,
                    answer[:1])
        return False
    return True


def interval(environ: dict[str, str] | None = None) -> float | None:
    """systemd's watchdog period in seconds, or None when there is none for this process."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def start(address: str, notifier: Notifier, period: float) -> threading.Event:
    """Probe every quarter `period` (each probe bounded by as much), send WATCHDOG=1 after
    each answer; set the returned event to stop."""
    stop = threading.Event()
    quarter = period / 4

    def loop() -> None:
        while not stop.is_set():
            if probe(address, timeout=quarter):
                notifier.send("WATCHDOG=1")
            stop.wait(quarter)

    threading.Thread(target=loop, name="watchdog", daemon=True).start()
    return stop

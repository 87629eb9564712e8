"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

One datagram per state change to the unix socket named by $NOTIFY_SOCKET (a path, or `@name`
for the abstract namespace): `READY=1` once the milter socket is open and config and keys are
loaded, `RELOADING=1` with `MONOTONIC_USEC` (systemd >= 253 wants it for Type=notify-reload,
and it does no harm before) then `READY=1` around a SIGUSR1 reload, `STOPPING=1` on stop.
Without $NOTIFY_SOCKET (not under systemd, or another Type=) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Send sd_notify messages to $NOTIFY_SOCKET; a no-op when it is unset."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        """Send one datagram of `KEY=VALUE` lines; a failure is logged, never raised."""
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as exc:
                log.warning("sd_notify %s: %s", fields[0], exc.strerror)

    def ready(self) -> None:
        self.send("READY=1", "STATUS=serving")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

"""The server's side of a figure: CPU seconds of a local server process, from /proc.

Client CPU alone hides work moved to the server (a client that sends more, smaller
requests makes the server work harder), so rows of a server the bench started show both.
"""

from __future__ import annotations

import os


class ServerCpu:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""

    def __init__(self, pid: int) -> None:
        self._path = f"/proc/{pid}/stat"
        self._tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        with open(self._path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime (fields 14 and 15)

    @staticmethod
    def of(pid: int | None) -> ServerCpu | None:
        """The meter of ``pid``, or ``None`` where it cannot be read (no /proc, not local)."""
        if pid is None or not os.path.exists(f"/proc/{pid}/stat"):
            return None
        return ServerCpu(pid)

"""The application's process-wide settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailward.app import limit_malloc_arenas

# Threads that allocate at once (as libmilter's do), then glibc's count of arenas
# (malloc_stats prints one "Arena N:" block per arena on stderr).
ARENAS = """
import ctypes, sys, threading
from mailward.app import limit_malloc_arenas
print({"capped": limit_malloc_arenas, "one": lambda: limit_malloc_arenas(1),
       "free": lambda: None}[sys.argv[1]]())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    blocks = [libc.malloc(4096) for _ in range(2000)]
    for b in blocks:
        libc.free(b)
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True,
                         check=True, env=env)
    return out.stdout.strip(), out.stderr.count("Arena ")


def test_the_milter_keeps_two_malloc_arenas() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    said, capped = arenas("capped", env)
    assert said == "True" and capped <= 2
    said, free = arenas("free", env)
    assert said == "None" and free > 2  # without the cap, glibc makes more


def test_the_asyncio_engine_keeps_one_malloc_arena() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    said, count = arenas("one", env)
    assert said == "True" and count == 1


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False

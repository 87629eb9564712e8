"""DKIM key files: what `load_key` refuses before and after reading, and safe key file names."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailward.services import keys

ED25519_SEED = b"bm90IGEgcmVhbCBrZXkgYnV0IDMyIGJ5dGVzIGxvbmc=\n"  # base64 of 32 bytes


def key_file(tmp_path: Path, mode: int, data: bytes = ED25519_SEED) -> Path:
    path = tmp_path / "k.key"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def load(path: Path | str) -> keys.SigningKey:
    return keys.load_key(str(path), domain="example.com", selector="s1")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_and_group_readable_keys_load(tmp_path: Path, mode: int) -> None:
    """Group-readable is accepted: root:mailward 0640 lets mailward read what it can't change."""
    key = load(key_file(tmp_path, mode))
    assert key.algorithm == b"ed25519-sha256"


@pytest.mark.parametrize(("mode", "expected"), [
    (0o644, "key file is readable by others (mode 644)"),
    (0o604, "key file is readable by others (mode 604)"),
    (0o602, "key file is writable by others (mode 602)"),
    (0o620, "key file is writable by its group (mode 620)"),
    (0o660, "key file is writable by its group (mode 660)"),
    (0o666, "key file is readable by others and writable by others and writable by its group "
            "(mode 666)"),
])
def test_keys_others_may_read_or_anyone_else_change_are_refused(tmp_path: Path, mode: int,
                                                                 expected: str) -> None:
    path = key_file(tmp_path, mode)
    with pytest.raises(keys.KeyFileError) as err:
        load(path)
    assert str(err.value) == (f"{path}: {expected}; chmod 600 it (or 640 for a group that only "
                              "reads it)")


def load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    """`load_key(path)` in a child with 512 MiB of address space and 20 seconds: a loader
    that reads /dev/zero to the end or waits on a FIFO fails there, not in the test run."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
        from mailward.services import keys
        try:
            keys.load_key({str(path)!r}, domain="example.com", selector="s1")
        except keys.KeyFileError as exc:
            print(exc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20, check=False)


@pytest.mark.parametrize(("kind", "expected"), [
    ("/dev/zero", "not a regular file (a character device)"),
    ("fifo", "not a regular file (a FIFO)"),
    ("directory", "not a regular file (a directory)"),
])
def test_what_is_not_a_regular_file_is_refused_before_reading(tmp_path: Path, kind: str,
                                                              expected: str) -> None:
    path = Path(kind)
    if kind == "fifo":
        path = tmp_path / "k.key"
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path = tmp_path / "keys"
        path.mkdir(mode=0o700)
    done = load_in_child(path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}: {expected}\n", "")


def test_a_key_file_is_read_up_to_64_kib(tmp_path: Path) -> None:
    path = key_file(tmp_path, 0o600, b"A" * (64 * 1024 + 1))
    with pytest.raises(keys.KeyFileError) as err:
        load(path)
    assert str(err.value) == f"{path}: larger than 64 KiB, not a DKIM key"
    path.write_bytes(b" " * (64 * 1024 - len(ED25519_SEED)) + ED25519_SEED)
    assert load(path).algorithm == b"ed25519-sha256"  # within the cap: read and parsed


@pytest.mark.parametrize(("domain", "selector", "expected"), [
    ("../x", "s1", "domain '../x' is not a DNS name: it has an empty label"),
    ("example.com", "../../etc/cron.d/x", "selector '../../etc/cron.d/x' is not a DNS name"),
    ("example.com/..", "s1", "label 'com/' is not 1 to 63 letters, digits and hyphens"),
    ("ex ample.com", "s1", "label 'ex ample' is not"),
    ("example.com", "", "selector '' is not a DNS name: it must have 1 to 253 characters"),
    ("example.com", "-s1", "label '-s1' is not"),
    ("example.com.", "s1", "it has an empty label (a leading, trailing or doubled dot)"),
    ("a" * 64 + ".example", "s1", "is not 1 to 63 letters"),
])
def test_generate_refuses_names_that_are_not_dns_names(tmp_path: Path, domain: str,
                                                       selector: str, expected: str) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    with pytest.raises(ValueError, match="is not a DNS name") as err:
        keys.generate(domain=domain, selector=selector, kind="ed25519", directory=str(keydir))
    assert expected in str(err.value)
    assert list(tmp_path.rglob("*.key")) == []  # nothing written, inside or outside keydir


def test_dns_names_for_keys() -> None:
    for name in ("example.com", "mail-2026.example.co.uk", "s1", "2026a", "x" * 63):
        assert keys.dns_name_problem(name) == "", name
    assert keys.dns_name_problem("a." * 126 + "ab") == "it must have 1 to 253 characters"

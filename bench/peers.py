"""mailward against its C peers and the pymilter floor, through one private Postfix set-up each
(issue 9). Run by hand as root on Debian (`make bench`; bench/README.md explains it all):

    .venv/bin/python bench/peers.py [--rounds 3] [-n 1500] [--sessions 1,8,32]
                                    [--large 200,50,20] [--quick] [--at REV] [--keep]

It re-runs itself in its own network and mount namespaces (only a loopback interface, where
connections come from 192.0.2.10 and /etc/resolv.conf names 127.0.0.1). Four set-ups there,
identical Postfix settings apart from smtpd_milters, each relaying to its own smtp-sink (which
dumps every message to a file), all against one DNS server on 127.0.0.1:53:
  none      no milter
  mailward  `python -m mailward run`, full default inbound chain, unix socket
  c-chain   OpenDKIM (verify) + OpenDMARC (SPFSelfValidate, RejectFailures), Debian's
  null      bench/nullmilter.py: pymilter with mailward's callbacks, adds one header
A DKIM-signed, SPF- and DMARC-aligned corpus of 4 KB messages is sent with smtp-source at each
session count, `-n` messages per window, in every round; the set-ups take turns, in an order
rotated each round. Then the large corpus (100 KB, 1 MB, 5 MB bodies, 8 sessions). Every
delivered copy is checked for the pass results of the milter under test.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from peerlab import (
    CLIENT,
    DOMAIN,
    SELECTOR,
    WORK_ENV,
    AsyncNull,
    CChain,
    Maillog,
    Mailward,
    MailwardDebian,
    MailwardExperiment,
    MailwardLibmilter,
    MailwardNoReports,
    Milters,
    NullMilter,
    SmtpSink,
    busy_seconds,
    enter_namespaces,
    header_fields,
    hwm_kib,
    nameserver_on,
    proc_table,
    refusals,
    reset_hwm,
    settle,
    signed_message,
    smtp_source,
    tree_cpu,
    write_for_smtp_source,
    zone,
)

from mailward.lab.dns import Nameserver
from mailward.lab.postfix import PostfixLab
from mailward.services import keys

MIB = 1024 * 1024
LARGE_SIZES = (100 * 1024, MIB, 5 * MIB)
LARGE_SESSIONS = 8
CPUS = os.cpu_count() or 1


@dataclass
class Setup:
    """One variant: its milters, its Postfix, its smtp-sink."""

    milters: Milters
    lab: PostfixLab
    sink: SmtpSink
    maillog: Maillog

    @property
    def name(self) -> str:
        return self.milters.name

    def master_pid(self) -> int:
        try:
            return int((self.lab.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0


@dataclass
class Window:
    """One measured window: `sent` messages of one corpus at one session count."""

    variant: str
    corpus: str
    sessions: int
    round: int
    sent: int
    seconds: float = 0.0
    delivered: int = 0
    rejected: int = 0
    verified: int = 0
    milter_cpu: float = 0.0
    milter_parts: dict[str, float] = field(default_factory=dict)
    lab_cpu: float = 0.0
    driver_cpu: float = 0.0  # this process alone: polling the maillog and the DNS server
    other_cpu: float = 0.0
    peak_kib: int = 0
    dns_queries: int = 0
    dns_names: collections.Counter[str] = field(default_factory=collections.Counter)
    body_bytes: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    extra: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def lost(self) -> int:
        return self.sent - self.delivered - self.rejected

    @property
    def rate(self) -> float:
        return (self.delivered + self.rejected) / self.seconds if self.seconds else 0.0


def send_and_wait(setup: Setup, message_file: Path, *, count: int, sessions: int,
                  work: Path, timeout: float) -> tuple[float, int]:
    """Send `count` messages; return (seconds from the start of smtp-source until Postfix
    has delivered or refused the last one, refusals smtp-source saw). The maillog tells
    when each message left; the sink's dump files are counted afterwards."""
    log = work / f"smtp-source-{setup.name}.err"
    setup.maillog.mark()
    start = time.perf_counter()
    source = smtp_source(setup.lab.smtp_port, message_file, count, sessions, log)
    deadline, stalled_since, seen = time.monotonic() + timeout, 0.0, -1
    while True:
        time.sleep(0.01)
        setup.maillog.poll()
        done = setup.maillog.sent + setup.maillog.refused
        if done >= count:
            break
        if source.poll() is not None:
            if setup.maillog.sent + refusals(log) >= count:
                break
            if done != seen:
                seen, stalled_since = done, time.monotonic()
            elif time.monotonic() - stalled_since > 10:
                break  # the rest is lost: reported as such
        if time.monotonic() > deadline:
            break
    seconds = time.perf_counter() - start
    try:
        source.wait(timeout=60)
    except Exception:
        source.kill()
        source.wait()
    return seconds, refusals(log)


def settle_sink(setup: Setup, expected: int) -> None:
    """Wait until the sink holds `expected` files and Postfix's queue is empty (bounded)."""
    settle(lambda: len(setup.sink.files()) >= expected, 10)
    settle(lambda: not setup.lab.queue(), 30, step=0.2)
    time.sleep(0.2)  # the last file's final write


SAMPLES: dict[str, list[tuple[str, str]]] = {}  # variant -> fields of one delivered copy


def verify(setup: Setup, window: Window, min_size: int) -> None:
    """Count and check every dump file of the window, then delete them."""
    for path in setup.sink.files():
        fields, size = header_fields(path)
        SAMPLES.setdefault(setup.name, fields)
        window.delivered += 1
        why = setup.milters.check(fields)
        if not why and size < min_size:
            why = f"short ({size} bytes)"
        if why:
            window.failures[why] += 1
        else:
            window.verified += 1
        if isinstance(setup.milters, CChain) and setup.milters.spf_passes(fields):
            window.extra["spf=pass"] += 1
        path.unlink()


@dataclass
class Run:
    """What every window shares: the DNS server, the warm-up message, the work directory and
    the Postfix master PIDs (for the lab's CPU)."""

    ns: Nameserver
    warm_file: Path
    work: Path
    masters: list[int]

    def measure(self, setup: Setup, *, corpus: str, message_file: Path, count: int,
                sessions: int, rnd: int, body_bytes: int) -> Window:
        """One window; a delivered copy must be at least as long as the corpus file."""
        return measure(setup, self.ns, corpus=corpus, message_file=message_file, count=count,
                       sessions=sessions, warm_file=self.warm_file, rnd=rnd,
                       body_bytes=body_bytes, min_size=message_file.stat().st_size, work=self.work,
                       all_masters=self.masters)


def measure(setup: Setup, ns: Nameserver, *, corpus: str, message_file: Path, count: int,
            sessions: int, warm_file: Path, rnd: int, body_bytes: int, min_size: int,
            work: Path, all_masters: list[int]) -> Window:
    window = Window(setup.name, corpus, sessions, rnd, count, body_bytes=body_bytes)
    # warm-up, not measured: smtpd processes spawned, milter caches filled
    warm = max(20, 2 * sessions)
    send_and_wait(setup, warm_file, count=warm, sessions=sessions, work=work, timeout=120)
    settle_sink(setup, warm)
    setup.sink.clear()
    dead = setup.milters.alive()
    if dead:
        raise RuntimeError(f"{setup.name}: milter process ended: {dead}")

    pids = dict(zip(setup.milters.procs, setup.milters.pids(), strict=True))
    for pid in pids.values():
        reset_hwm(pid)
    lab_roots = [os.getpid(), *all_masters]
    table = proc_table()
    cpu0 = {name: tree_cpu([pid], table) for name, pid in pids.items()}
    lab0, busy0, q0 = tree_cpu(lab_roots, table), busy_seconds(), len(ns.queries)
    own0 = os.times()

    window.seconds, window.rejected = send_and_wait(
        setup, message_file, count=count, sessions=sessions, work=work,
        timeout=max(300.0, count / 2))

    own1 = os.times()
    table = proc_table()
    busy1, q1 = busy_seconds(), len(ns.queries)
    window.driver_cpu = (own1.user + own1.system) - (own0.user + own0.system)
    window.milter_parts = {name: tree_cpu([pid], table) - cpu0[name]
                           for name, pid in pids.items()}
    window.milter_cpu = sum(window.milter_parts.values())
    window.lab_cpu = tree_cpu(lab_roots, table) - lab0
    window.other_cpu = max(0.0, (busy1 - busy0) - window.lab_cpu)
    window.peak_kib = sum(hwm_kib(pid) for pid in pids.values())
    window.dns_queries = q1 - q0
    window.dns_names.update(f"{t} {n}" for n, t, _ in ns.queries[q0:q1])
    settle_sink(setup, count - window.rejected)
    verify(setup, window, min_size)
    return window


# -- output ------------------------------------------------------------------------------------

def progress(w: Window) -> None:
    milter = (f"milter {1000 * w.milter_cpu / w.sent:6.2f} ms/msg, peak {w.peak_kib / 1024:6.1f}"
              f" MiB" if w.milter_parts else "milter      -             ")
    fails = "; ".join(f"{n}x {why}" for why, n in w.failures.items())
    print(f"  round {w.round} {w.corpus:>6} s={w.sessions:<2} {w.variant:8} {w.sent:5} msgs "
          f"{w.seconds:7.2f} s {w.rate:7.1f} msg/s  {milter}  LOST {w.lost}  verified "
          f"{w.verified}/{w.delivered}  DNS {w.dns_queries / w.sent:.2f} q/msg  other load "
          f"{100 * w.other_cpu / (CPUS * w.seconds):3.0f}%{'  ' + fails if fails else ''}",
          flush=True)


def per_round(ws: list[Window], ref: list[Window]) -> str:
    """The ratio of each round's rate to the reference's in that round, then their median."""
    by_round = {w.round: w.rate for w in ref}
    ratios = [w.rate / by_round[w.round] for w in sorted(ws, key=lambda w: w.round)
              if by_round.get(w.round)]
    if not ratios:
        return "-"
    text = " ".join(f"{r:.2f}" for r in ratios)
    return f"{text} ({statistics.median(ratios):.2f})" if len(ratios) > 1 else text


def table_small(windows: list[Window], sessions: list[int], variants: list[str]) -> None:
    print("\nThroughput, 4 KB corpus (msg/s: median over rounds; ratios: one per round, "
          "round 1 first, then their median)")
    print(f"{'sess':>4} {'variant':9} {'msg/s':>7}  {'msg/s per round':24} "
          f"{'vs none':22} {'vs c-chain':22}")
    for s in sessions:
        for v in variants:
            ws = sorted((w for w in windows if w.sessions == s and w.variant == v),
                        key=lambda w: w.round)
            none = [w for w in windows if w.sessions == s and w.variant == "none"]
            chain = [w for w in windows if w.sessions == s and w.variant == "c-chain"]
            rates = " ".join(f"{w.rate:.1f}" for w in ws)
            print(f"{s:>4} {v:9} {statistics.median(w.rate for w in ws):7.1f}  {rates:24} "
                  f"{per_round(ws, none):22} {per_round(ws, chain):22}")
    print("\nCost and accounting, 4 KB corpus (milter CPU: user+sys of the milter process "
          "tree over the window / messages, median over rounds; peak RSS: max VmHWM over "
          "windows, sum for the C pair; lab CPU: every process of the set-up incl. Postfix, "
          "sink, smtp-source, milters and this script; drv+DNS: this script alone, which "
          "polls the maillog and answers DNS, in ms/msg; sent/delivered/rejected/LOST/verified: "
          "sums over rounds)")
    print(f"{'sess':>4} {'variant':9} {'milter ms/msg':>13} {'peak RSS MiB':>12} "
          f"{'lab ms/msg':>10} {'drv+DNS':>7} {'DNS q/msg':>9} {'sent':>6} {'deliv':>6} "
          f"{'rej':>4} "
          f"{'LOST':>4} {'verified':>8}  notes")
    for s in sessions:
        for v in variants:
            ws = [w for w in windows if w.sessions == s and w.variant == v]
            cpu = statistics.median(1000 * w.milter_cpu / w.sent for w in ws)
            parts = ""
            if len(ws[0].milter_parts) > 1:
                parts = ", ".join(
                    f"{n} {statistics.median(1000 * w.milter_parts[n] / w.sent for w in ws):.2f}"
                    for n in ws[0].milter_parts)
                parts = f"ms/msg: {parts}"
            notes = [parts] if parts else []
            extra = sum((w.extra for w in ws), collections.Counter[str]())
            notes += [f"{n} with {k}" for k, n in extra.items()]
            fails = sum((w.failures for w in ws), collections.Counter[str]())
            notes += [f"{n}x {why}" for why, n in fails.items()]
            peak = max(w.peak_kib for w in ws) / 1024
            print(f"{s:>4} {v:9} "
                  f"{(f'{cpu:.3f}' if ws[0].milter_parts else '-'):>13} "
                  f"{(f'{peak:.1f}' if ws[0].milter_parts else '-'):>12} "
                  f"{statistics.median(1000 * w.lab_cpu / w.sent for w in ws):10.2f} "
                  f"{statistics.median(1000 * w.driver_cpu / w.sent for w in ws):7.2f} "
                  f"{sum(w.dns_queries for w in ws) / sum(w.sent for w in ws):9.2f} "
                  f"{sum(w.sent for w in ws):6} {sum(w.delivered for w in ws):6} "
                  f"{sum(w.rejected for w in ws):4} {sum(w.lost for w in ws):4} "
                  f"{sum(w.verified for w in ws):8}  {'; '.join(notes)}")
    others = [100 * w.other_cpu / (CPUS * w.seconds) for w in windows]
    print(f"\nCPU used outside the lab during the windows (other users of this host): median "
          f"{statistics.median(others):.0f}%, max {max(others):.0f}% of {CPUS} CPUs")


def table_large(windows: list[Window], variants: list[str]) -> None:
    print(f"\nLarge corpus, {LARGE_SESSIONS} sessions (milter CPU per MiB of body, median over "
          "rounds; peak RSS: max VmHWM over rounds, reset before each window)")
    print(f"{'body':>7} {'variant':9} {'msgs':>5} {'msg/s':>7} {'MiB/s':>7} "
          f"{'milter ms/MiB':>13} {'milter ms/msg':>13} {'peak RSS MiB':>12} {'LOST':>4} "
          f"{'verified':>8}  notes")
    for size in sorted({w.body_bytes for w in windows}):
        for v in variants:
            ws = [w for w in windows if w.body_bytes == size and w.variant == v]
            if not ws:
                continue
            mib = size / MIB
            rate = statistics.median(w.rate for w in ws)
            has_milter = bool(ws[0].milter_parts)
            per_mib = statistics.median(1000 * w.milter_cpu / (w.sent * mib) for w in ws)
            per_msg = statistics.median(1000 * w.milter_cpu / w.sent for w in ws)
            fails = sum((w.failures for w in ws), collections.Counter[str]())
            notes = "; ".join(f"{n}x {why}" for why, n in fails.items())
            print(f"{ws[0].corpus:>7} {v:9} {sum(w.sent for w in ws):5} {rate:7.1f} "
                  f"{rate * mib:7.1f} "
                  f"{(f'{per_mib:.1f}' if has_milter else '-'):>13} "
                  f"{(f'{per_msg:.1f}' if has_milter else '-'):>13} "
                  f"{(f'{max(w.peak_kib for w in ws) / 1024:.1f}' if has_milter else '-'):>12} "
                  f"{sum(w.lost for w in ws):4} {sum(w.verified for w in ws):8}  {notes}")


# -- main ----------------------------------------------------------------------------------------

def label(size: int) -> str:
    return f"{size // MIB}MB" if size >= MIB else f"{size // 1024}KB"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, help="rounds, variant order rotated (default 3)")
    ap.add_argument("-n", type=int, help="4 KB messages per window (default 1500)")
    ap.add_argument("--sessions", default="1,8,32", help="smtp-source session counts")
    ap.add_argument("--large", help="messages per window of 100 KB, 1 MB and 5 MB bodies "
                    "(default 200,50,20; 0: skip)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="a subset, for debugging (the ratios need none and c-chain)")
    ap.add_argument("--quick", action="store_true", help="smoke run: defaults of 1 round, "
                    "200 messages, large corpus 20,10,4")
    ap.add_argument("--at", metavar="REV", help="run mailward as committed at REV (git "
                    "archive) instead of from the working tree")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.n = args.n or (200 if quick else 1500)
    args.large = args.large or ("20,10,4" if quick else "200,50,20")
    args.sessions = [int(s) for s in args.sessions.split(",")]
    args.large = [int(n) for n in args.large.split(",")] if args.large != "0" else []
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(KINDS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    return args


KINDS: dict[str, type[Milters]] = {"none": Milters, "mailward": Mailward,
                                   "mw-deb": MailwardDebian, "mw-norep": MailwardNoReports,
                                   "c-chain": CChain, "null": NullMilter,
                                   # by hand only (--variants): see bench/README.md
                                   "null-async": AsyncNull, "mw-libmilter": MailwardLibmilter,
                                   "mw-exp": MailwardExperiment}
DEFAULT_VARIANTS = ["none", "mailward", "mw-deb", "mw-libmilter", "c-chain", "null"]


def start_setups(stack: contextlib.ExitStack, work: Path, variants: list[str],
                 dns_port: int) -> list[Setup]:
    """Start each variant's milters, smtp-sink and Postfix; `stack` stops them all."""
    setups = []
    for name in variants:
        milters = KINDS[name](work / name / "milter")
        stack.callback(milters.stop)
        milters.start(dns_port)
        sink = SmtpSink(work / name / "sink")
        stack.callback(sink.stop)
        lab = PostfixLab(work / name / "postfix", milters.smtpd_milters, sink.port,
                         {"non_smtpd_milters": "", "mynetworks": f"127.0.0.0/8, {CLIENT}/32"})
        stack.callback(lab.stop)  # runs first: Postfix stops before its milters and sink
        lab.start()
        setups.append(Setup(milters, lab, sink, Maillog(lab.maillog)))
        print(f"{name:9} {milters.title}: Postfix 127.0.0.1:{lab.smtp_port}, smtpd_milters = "
              f"{milters.smtpd_milters or '(none)'}", flush=True)
    return setups


def rotated(setups: list[Setup], rnd: int) -> list[Setup]:
    k = (rnd - 1) % len(setups)
    return setups[k:] + setups[:k]


def run_rounds(run: Run, setups: list[Setup], args: argparse.Namespace, small_file: Path,
               large_files: list[tuple[int, int, Path]]) -> tuple[list[Window], list[Window]]:
    """All rounds of the 4 KB corpus, then all rounds of the large one (so that the large
    bodies do not raise the milters' memory before the 4 KB windows are measured)."""
    small_windows: list[Window] = []
    large_windows: list[Window] = []
    for rnd in range(1, args.rounds + 1):
        order = rotated(setups, rnd)
        print(f"4 KB corpus, round {rnd}: order {', '.join(s.name for s in order)}",
              flush=True)
        for s in args.sessions:
            for setup in order:
                w = run.measure(setup, corpus="4KB", message_file=small_file, count=args.n,
                                sessions=s, rnd=rnd, body_bytes=0)
                progress(w)
                small_windows.append(w)
    for rnd in range(1, args.rounds + 1 if large_files else 1):
        order = rotated(setups, rnd)
        print(f"large corpus, round {rnd}: order {', '.join(s.name for s in order)}",
              flush=True)
        for size, count, path in large_files:
            for setup in order:
                w = run.measure(setup, corpus=label(size), message_file=path, count=count,
                                sessions=LARGE_SESSIONS, rnd=rnd, body_bytes=size)
                progress(w)
                large_windows.append(w)
    return small_windows, large_windows


def report(setups: list[Setup], args: argparse.Namespace, small_windows: list[Window],
           large_windows: list[Window], ns: Nameserver) -> None:
    names = [s.name for s in setups]
    table_small(small_windows, args.sessions, names)
    if large_windows:
        table_large(large_windows, names)
    print("\nResults added by the milters (one delivered copy per set-up, 4 KB corpus):")
    for name in names:
        added = [f"{n}: {v}" for n, v in SAMPLES.get(name, [])
                 if n.lower() in ("authentication-results", "x-null-milter")]
        print(f"  {name:9} " + ("\n            ".join(added) or "(nothing added)"))
    print("\nDNS queries that reached the server in the measured windows, per message:")
    for name in names:
        ws = [w for w in small_windows + large_windows if w.variant == name]
        total = sum((w.dns_names for w in ws), collections.Counter[str]())
        sent = sum(w.sent for w in ws)
        print(f"  {name:9} " + (", ".join(f"{q} {n / sent:.2f}" for q, n in total.most_common())
                                or "none"))
    print(f"\nDNS queries: {len(ns.queries)} in all, warm-ups included; host: {CPUS} CPUs, "
          f"load average now {Path('/proc/loadavg').read_text().split()[0]}")


TOP = Path(__file__).resolve().parents[1]


def git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(TOP), *args], capture_output=True, check=False)


def use_revision(rev: str, work: Path) -> str:
    """Run mailward from `git archive REV milter` (not the working tree, which others may be
    changing): the milter processes get PYTHONPATH first. Returns the commit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").stdout.decode().strip()
    if not commit:
        raise SystemExit(f"--at {rev}: no such commit")
    archive = git("archive", "--format=tar", commit, "milter")
    if archive.returncode != 0:
        raise SystemExit(f"git archive {commit}: {archive.stderr.decode().strip()}")
    src = work / "src"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(src / "milter"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return commit[:12]


def versions(commit: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}, ", "postfix",
                          "opendkim", "opendmarc", "libmilter1.0.1"],
                         capture_output=True, text=True, check=False).stdout
    import Milter  # noqa: PLC0415 - only for its version
    if commit:
        state = f"{commit} (git archive)"
    else:
        head = git("rev-parse", "--short=12", "HEAD").stdout.decode().strip() or "?"
        dirty = git("status", "--porcelain", "--", "milter").stdout.splitlines()
        state = f"the working tree: {head}" + (
            f" + uncommitted changes to {len(dirty)} file(s) under milter/" if dirty else "")
    return (f"{out}pymilter {getattr(Milter, '__version__', '?')}, "
            f"Python {sys.version.split()[0]}; mailward from {state}")


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespace, private Postfix instances)", file=sys.stderr)
        return 2
    if not os.environ.get(WORK_ENV):  # first, move into the bench's own namespaces
        work = Path(tempfile.mkdtemp(prefix="mailward-peers-"))
        os.chmod(work, 0o755)  # noqa: S103 - Postfix (user postfix) must reach it
        try:
            enter_namespaces(work, [sys.executable, *sys.argv])
        except OSError as exc:  # exec failed; on success there is no return
            shutil.rmtree(work, ignore_errors=True)
            print(f"cannot run unshare: {exc}", file=sys.stderr)
        return 2
    work = Path(os.environ[WORK_ENV])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        if args.keep:
            stack.callback(print, f"work directory kept: {work}")
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        commit = use_revision(args.at, work) if args.at else ""
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(sys.argv)}\n"
              f"{versions(commit)}\nnetwork: private namespaces, SMTP and DNS clients come "
              f"from {CLIENT}, DNS on 127.0.0.1:53", flush=True)
        key = keys.generate(domain=DOMAIN, selector=SELECTOR, directory=str(work))
        ns = nameserver_on(53, negative_ttl=86400)
        stack.callback(ns.close)
        ns.load_zone(zone(key))
        small = signed_message(key, "4k", total=4096)
        small_file = work / "msg-4k.txt"
        write_for_smtp_source(small_file, small)
        large_files = []
        for size, count in zip(LARGE_SIZES, args.large, strict=False):
            path = work / f"msg-{label(size)}.txt"
            write_for_smtp_source(path, signed_message(key, label(size), body=size))
            large_files.append((size, count, path))
        print(f"corpus: {len(small)} bytes per message (DKIM rsa-sha256 relaxed/relaxed, "
              f"2048-bit key, d={DOMAIN}); large: "
              f"{', '.join(f'{label(s)} x {c}' for s, c, _ in large_files) or 'skipped'}; "
              f"{args.rounds} round(s)", flush=True)
        setups = start_setups(stack, work, args.variants, ns.port)
        run = Run(ns, small_file, work, [s.master_pid() for s in setups])
        small_windows, large_windows = run_rounds(run, setups, args, small_file, large_files)
        report(setups, args, small_windows, large_windows, ns)
        bad = [w for w in small_windows + large_windows if w.lost or w.verified != w.delivered]
        return 1 if bad else 0
    return 1  # not reached: for mypy, ExitStack may swallow exceptions


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared pieces of skerry's benchmark: namespaces, processes, sampling.

Everything this module creates is owned by one `Harness` and removed by
`Harness.close()`, which runs on normal exit, on an exception, on SIGINT and
on SIGTERM. Namespaces are named `skb-<pid>-<role>`; processes are kept by
PID (each in its own process group, so a daemon's workers and a forking
relay's children go with it) and never looked up by name.

Addresses (all from 198.18.0.0/15, the range reserved for benchmarks):

    client 198.18.1.1 ── 198.18.1.2 edge ("public")
    edge   198.18.2.1 ── 198.18.2.2 home (the home dials the edge here)
    tunnels: skerry 198.18.3.0/30, boringtun 198.18.4.0/24,
             wireguard-go 198.18.5.0/24

The edge has ip_forward=0, so nothing in the client namespace can reach the
home namespace except through a tunnel; the `direct` setup turns forwarding
on for its own duration and off again.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
TOOLS_BIN = BENCH_DIR / ".tools" / "bin"
PREFIX = "skb-"

CLIENT_IP = "198.18.1.1"
EDGE_PUBLIC_IP = "198.18.1.2"
EDGE_HOME_SIDE_IP = "198.18.2.1"
HOME_IP = "198.18.2.2"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def tool(name: str) -> str | None:
    """Finds a program: bench/.tools/bin first, then PATH."""
    p = TOOLS_BIN / name
    if p.exists():
        return str(p)
    return shutil.which(name)


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    role: str | None  # "edge", "home" or None (services, helpers)
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class ProcTree:
    """Samples a set of root processes and their descendants."""

    def __init__(self) -> None:
        self.roots: list[int] = []

    @staticmethod
    def _stat(pid: int) -> tuple[int, int, int] | None:
        """(ppid, utime+stime, cutime+cstime) in ticks."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            return None
        rest = s[s.rfind(")") + 2 :].split()
        # rest[0] is state (field 3); ppid field 4; utime 14, stime 15, cutime 16, cstime 17
        return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])

    @staticmethod
    def _status_kb(pid: int, *keys: str) -> list[int]:
        """The kB values of `keys` in /proc/PID/status (0 for one absent or a process gone), read once."""
        found = dict.fromkeys(keys, 0)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in found:
                        found[key] = int(line.split()[1])
        except OSError:
            pass
        return [found[k] for k in keys]

    def descendants(self) -> set[int]:
        pids = set(self.roots)
        frontier = list(self.roots)
        while frontier:
            pid = frontier.pop()
            kids: list[int] = []
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        kids.extend(int(x) for x in f.read().split())
            except OSError:
                continue
            for k in kids:
                if k not in pids:
                    pids.add(k)
                    frontier.append(k)
        return pids

    def sample(self) -> tuple[int, int, int, int]:
        """(cpu ticks incl. reaped children of roots, sum VmRSS kB, sum VmHWM kB of roots,
        sum RssAnon kB: heap, stacks and buffers, as opposed to mapped files)."""
        ticks = 0
        rss = anon = hwm = 0
        for pid in self.descendants():
            st = self._stat(pid)
            if st is None:
                continue
            ticks += st[1]
            if pid in self.roots:
                ticks += st[2]
            vm_rss, rss_anon, vm_hwm = self._status_kb(pid, "VmRSS", "RssAnon", "VmHWM")
            rss += vm_rss
            anon += rss_anon
            if pid in self.roots:
                hwm += vm_hwm
        return ticks, rss, hwm, anon


class Sampler:
    """Background sampling of the edge and home processes of one setup."""

    INTERVAL = 0.1

    def __init__(self) -> None:
        self.trees = {"edge": ProcTree(), "home": ProcTree()}
        self.peak_kb = {"edge": 0, "home": 0}
        self.peak_anon_kb = {"edge": 0, "home": 0}
        self.last_ticks = {"edge": 0, "home": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, role: str, pid: int) -> None:
        with self._lock:
            self.trees[role].roots.append(pid)

    def sample_now(self) -> dict[str, tuple[int, int]]:
        out = {}
        with self._lock:
            for role, tree in self.trees.items():
                if not tree.roots:
                    continue
                ticks, rss, hwm, anon = tree.sample()
                # Ticks only grow; a root that exited takes its count with it.
                self.last_ticks[role] = max(self.last_ticks[role], ticks)
                self.peak_kb[role] = max(self.peak_kb[role], rss, hwm)
                self.peak_anon_kb[role] = max(self.peak_anon_kb[role], anon)
                out[role] = (self.last_ticks[role], self.peak_kb[role])
        return out

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.INTERVAL):
                self.sample_now()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.sample_now()
        self._stop.set()
        if self._thread:
            self._thread.join()

    def cpu_ticks(self) -> dict[str, int]:
        s = self.sample_now()
        return {r: v[0] for r, v in s.items()}

    def has(self, role: str) -> bool:
        return bool(self.trees[role].roots)


# ---------------------------------------------------------------- harness


class Harness:
    """Owns namespaces, links, processes and a scratch directory."""

    def __init__(self, scratch_root: Path | None = None) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.ns = {r: f"{self.tag}-{r}" for r in ("c", "e", "h")}
        self.procs: list[Proc] = []
        self.namespaces: list[str] = []
        root = scratch_root or BENCH_DIR / ".scratch"
        root.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir=root))
        os.chmod(self.scratch, 0o700)
        self._closed = False
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        log(f"signal {signum}: cleaning up")
        self.close()
        sys.exit(128 + signum)

    @property
    def client(self) -> str:
        return self.ns["c"]

    @property
    def edge(self) -> str:
        return self.ns["e"]

    @property
    def home(self) -> str:
        return self.ns["h"]

    # -- namespaces

    @staticmethod
    def sweep_stale() -> None:
        """Removes `skb-<pid>-*` namespaces whose creating process is gone."""
        try:
            names = os.listdir("/run/netns")
        except OSError:
            return
        for n in names:
            m = re.fullmatch(rf"{PREFIX}(\d+)-[ceh]", n)
            if not m:
                continue
            pid = int(m.group(1))
            if Path(f"/proc/{pid}").exists():
                continue
            for p in run(["ip", "netns", "pids", n], check=False).stdout.split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            run(["ip", "netns", "del", n], check=False)
            log(f"removed stale namespace {n}")

    def ns_sh(self, ns: str, *cmds: str) -> None:
        for c in cmds:
            run(["ip", "netns", "exec", ns, "sh", "-c", c])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def build_topology(self) -> None:
        for ns in self.ns.values():
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Many short connections per run from one client address.
            self.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
            self.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
            self.sysctl(ns, "net.core.somaxconn", "4096")
            self.sysctl(ns, "net.ipv4.ip_forward", "0")
        t = self.tag[len(PREFIX) :]
        links = [
            (self.client, f"skb{t}c", CLIENT_IP, self.edge, f"skb{t}ep", EDGE_PUBLIC_IP, "198.18.1"),
            (self.edge, f"skb{t}eh", EDGE_HOME_SIDE_IP, self.home, f"skb{t}h", HOME_IP, "198.18.2"),
        ]
        for a_ns, a_if, a_ip, b_ns, b_if, b_ip, _net in links:
            run(["ip", "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if, "netns", b_ns])
            run(["ip", "-n", a_ns, "addr", "add", f"{a_ip}/24", "dev", a_if])
            run(["ip", "-n", b_ns, "addr", "add", f"{b_ip}/24", "dev", b_if])
            run(["ip", "-n", a_ns, "link", "set", a_if, "up"])
            run(["ip", "-n", b_ns, "link", "set", b_if, "up"])
        # The client knows the edge's public address only.
        log(f"namespaces {', '.join(self.ns.values())} ready")

    def set_direct_routing(self, on: bool) -> None:
        verb = "add" if on else "del"
        run(["ip", "-n", self.client, "route", verb, "198.18.2.0/24", "via", EDGE_PUBLIC_IP], check=on)
        run(["ip", "-n", self.home, "route", verb, "198.18.1.0/24", "via", EDGE_HOME_SIDE_IP], check=on)
        self.sysctl(self.edge, "net.ipv4.ip_forward", "1" if on else "0")

    # -- processes

    def spawn(
        self,
        ns: str | None,
        argv: list[str],
        name: str,
        role: str | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
        text_pipes: bool = False,
    ) -> Proc:
        full = (["ip", "netns", "exec", ns] if ns else []) + argv
        log_path = self.scratch / f"{name}.log"
        logf = open(log_path, "ab")
        e = dict(os.environ)
        if env:
            e.update(env)
        p = subprocess.Popen(
            full,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=e,
            start_new_session=True,  # own process group: ends with its children
            **({"text": True, "bufsize": 1} if text_pipes else {}),
        )
        logf.close()
        proc = Proc(name, p, role, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        if proc.alive():
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of its group (workers, forked children).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in list(reversed(self.procs)):
            self.stop(p, grace=2.0)
        for ns in self.namespaces:
            # Anything still inside (should be nothing) was started by us.
            for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        if os.environ.get("SKB_KEEP_SCRATCH") != "1":
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:
            log(f"scratch kept in {self.scratch}")


# ---------------------------------------------------------------- waiting


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


def listening(h: Harness, ns: str, proto: str, port: int) -> bool:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    out = run(["ip", "netns", "exec", ns, "ss", flag, f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def read_json(text: str) -> dict:
    return json.loads(text)


def version_of(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # `python3 bench/harness.py --sweep`: remove namespaces left by a crashed run.
    if sys.argv[1:] == ["--sweep"]:
        Harness.sweep_stale()
    else:
        print("usage: harness.py --sweep", file=sys.stderr)
        sys.exit(2)

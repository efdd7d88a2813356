#!/usr/bin/env python3
"""Port-change benchmark (issue 3): how fast a live port change takes effect.

    sudo python3 bench/port_changes.py [--changes 200] [--quick]

On the benchmark's three namespaces, with a running edge-agent/home-agent
pair (release builds):

1. with a 1-entry map: `home-agent ports add --name N tcp/P=…`, then time from
   that command returning (exit 0) to the edge's public port P accepting a TCP
   connection from the client namespace; then `home-agent ports rm --name N tcp/P`.
   Repeated over --changes ports; p50/p99.
2. time to apply a 1,000-entry map from empty: one `ports add` with 1,000
   specs, to its return and to the last of the 1,000 ports accepting.
3. the same as 1 with those 1,000 entries in the map.

Uses the admin interface `home-agent ports add|rm --name N …` and
`home-agent status --name N --json`. If this build of home-agent has no
`ports` subcommand, it records "not available in this build" and exits 0.
Results go into bench/results/latest.json ("port_changes") and
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import report
import setups as S
from harness import BENCH_DIR, EDGE_PUBLIC_IP, Harness, Sampler, log, wait_until

LOADGEN = str(BENCH_DIR / ".tools" / "bin" / "skb-loadgen")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


class Agent:
    """Talks to the running home-agent through its CLI, from the root namespace
    (the admin socket is a path, not a network address)."""

    def __init__(self, sk: S.Skerry, h: Harness) -> None:
        self.bin = sk.home_bin
        self.name = sk.NAME
        self.env = {**os.environ, **sk.env(h)}

    def cli(self, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
        t = time.monotonic()
        r = subprocess.run([self.bin, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        return r, time.monotonic() - t

    def add(self, *specs: str) -> float:
        r, dt = self.cli("ports", "add", "--name", self.name, *specs)
        if r.returncode != 0:
            raise RuntimeError(f"ports add {specs[0]}{'…' if len(specs) > 1 else ''} exited {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        return dt

    def rm(self, *keys: str) -> float:
        r, dt = self.cli("ports", "rm", "--name", self.name, *keys)
        if r.returncode != 0:
            raise RuntimeError(f"ports rm {keys[0]} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
        return dt

    def status(self) -> dict:
        r, _ = self.cli("status", "--name", self.name, "--json")
        if r.returncode != 0:
            raise RuntimeError(f"status exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
        return json.loads(r.stdout)


def availability(home_bin: str) -> str | None:
    """None if the admin subcommands exist, else why not."""
    if not Path(home_bin).exists():
        return f"{home_bin} is not built"
    for args in (["ports", "add", "--help"], ["ports", "rm", "--help"], ["status", "--help"]):
        r = subprocess.run([home_bin, *args], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return f"`home-agent {' '.join(args[:-1])}` is not in this build ({(r.stderr or r.stdout).strip().splitlines()[0][:120] if (r.stderr or r.stdout).strip() else 'exit ' + str(r.returncode)})"
    r = subprocess.run([home_bin, "status", "--help"], capture_output=True, text=True, timeout=10)
    if "--json" not in r.stdout:
        return "`home-agent status` has no --json in this build"
    return None


def changes(agent: Agent, probe: subprocess.Popen, base_port: int, n: int, what: str) -> tuple[list[float], list[float], dict]:
    lat, cmd, first_try, start = [], [], 0, []
    for i in range(n):
        port = base_port + i
        dt = agent.add(f"tcp/{port}=127.0.0.1:{S.ECHO_PORT}")
        t_ret = time.monotonic()
        probe.stdin.write(f"one {port} {t_ret:.9f}\n")  # type: ignore[union-attr]
        probe.stdin.flush()  # type: ignore[union-attr]
        ans = probe.stdout.readline().split()  # type: ignore[union-attr]
        if not ans or ans[0] != "ok":
            raise RuntimeError(f"{what}: port {port} never accepted after `ports add` returned ({' '.join(ans)})")
        lat.append(float(ans[1]))
        first_try += ans[2] == "1"
        start.append(float(ans[3]))
        cmd.append(dt)
        agent.rm(f"tcp/{port}")
        if (i + 1) % 50 == 0:
            log(f"  {what}: {i + 1}/{n} changes, p50 so far {ms(statistics.median(lat))}")
    # removed ports refuse again (a sanity check, not timed)
    probe.stdin.write(f"closed {base_port}\n")  # type: ignore[union-attr]
    probe.stdin.flush()  # type: ignore[union-attr]
    if probe.stdout.readline().strip() != "ok":  # type: ignore[union-attr]
        raise RuntimeError(f"{what}: port {base_port} still accepts after `ports rm`")
    return lat, cmd, {"accepted_on_first_attempt": first_try, "probe_start_p50_s": statistics.median(start)}


def count_ports(j) -> int | None:
    """Length of the first "ports" list anywhere in a status answer."""
    if isinstance(j, dict):
        if isinstance(j.get("ports"), list):
            return len(j["ports"])
        for v in j.values():
            n = count_ports(v)
            if n is not None:
                return n
    return None


def baseline(probe: subprocess.Popen, port: int, n: int = 30) -> float:
    """Median time for the probe to connect to a port that is already open."""
    xs = []
    for _ in range(n):
        probe.stdin.write(f"one {port} {time.monotonic():.9f}\n")  # type: ignore[union-attr]
        ans = probe.stdout.readline().split()  # type: ignore[union-attr]
        if ans and ans[0] == "ok":
            xs.append(float(ans[1]))
    return statistics.median(xs) if xs else float("nan")


def row(label: str, xs: list[float]) -> dict:
    return {"label": label, "p50": ms(pct(xs, 50)), "p99": ms(pct(xs, 99)), "max": ms(max(xs)),
            "raw_s": [round(x, 6) for x in xs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, help="changes per map size (default 200; 40 with --quick)")
    ap.add_argument("--entries", type=int, default=1000, help="size of the large map (default 1000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "latest.json"))
    ap.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"))
    a = ap.parse_args()
    n = a.changes or (40 if a.quick else 200)
    if os.geteuid() != 0:
        print("port_changes.py: needs root: sudo bench/run.sh --port-changes-only", file=sys.stderr)
        return 2
    sk = S.Skerry()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "changes": n, "version": ""}
    why = sk.missing() or availability(sk.home_bin)
    if why:
        log(f"port changes: not available in this build: {why}")
        result.update(available=False, reason=why)
        save(a, result)
        print(f"port-change benchmark: not available in this build: {why}")
        return 0

    Harness.sweep_stale()
    h = Harness()
    h.build_topology()
    # keep the edge's ephemeral ports clear of the ports this benchmark opens
    h.sysctl(h.edge, "net.ipv4.ip_local_port_range", "40000 60999")
    sk.prepare(h)
    result["version"] = sk.version()
    echo = h.spawn(h.home, [LOADGEN, "serve", f"127.0.0.1:{S.ECHO_PORT}"], "echo-server")
    sampler = Sampler()
    sk.start_pair(h, sampler, [f"tcp/{S.ECHO_PORT}=127.0.0.1:{S.ECHO_PORT}"])
    sampler.start()
    agent = Agent(sk, h)
    wait_until(lambda: agent.status(), 20, "home-agent status --json")
    probe = h.spawn(h.client, [sys.executable, str(BENCH_DIR / "port_probe.py"), EDGE_PUBLIC_IP], "port-probe",
                    stdout_pipe=True, stdin_pipe=True, text_pipes=True)
    rows, extra = [], {}
    try:
        log(f"port changes with a 1-entry map ({n} changes)")
        lat1, cmd1, d1 = changes(agent, probe.popen, 20000, n, "1-entry map")
        b1 = baseline(probe.popen, S.ECHO_PORT)
        extra["1-entry map, probe"] = (f"the same probe connecting to a port that was open all along takes {ms(b1)} (p50); "
                                       f"{d1['accepted_on_first_attempt']} of {n} ports accepted the probe's first connection "
                                       f"attempt (the port was already open when `ports add` returned); the probe's first "
                                       f"attempt started {ms(d1['probe_start_p50_s'])} (p50) after the return")
        rows += [row("1-entry map: `ports add` returned → port accepts", lat1),
                 row("1-entry map: `ports add` command wall time", cmd1)]

        big = [30000 + i for i in range(a.entries)]
        agent.rm(f"tcp/{S.ECHO_PORT}")
        log(f"applying a {a.entries}-entry map from empty")
        t0 = time.monotonic()
        dt = agent.add(*[f"tcp/{p}=127.0.0.1:{S.ECHO_PORT}" for p in big])
        t_ret = time.monotonic()
        probe.popen.stdin.write(f"all {t_ret:.9f} {','.join(map(str, big))}\n")  # type: ignore[union-attr]
        ans = probe.popen.stdout.readline().split()  # type: ignore[union-attr]
        if not ans or ans[0] != "ok":
            raise RuntimeError(f"{a.entries}-entry map: not every port accepted ({' '.join(ans)})")
        last = float(ans[1])
        st = agent.status()
        extra[f"apply a {a.entries}-entry map from empty"] = (
            f"`ports add` with {a.entries} specs returned after **{ms(dt)}**; "
            f"all {a.entries} ports accepted {ms(t_ret - t0 + last)} after the command started "
            f"(the probe connects to them one after another, so this includes {a.entries} TCP handshakes)")
        result["status_ports_after_apply"] = count_ports(st)

        log(f"port changes with a {a.entries}-entry map ({n} changes)")
        latk, cmdk, dk = changes(agent, probe.popen, 20000, n, f"{a.entries}-entry map")
        bk = baseline(probe.popen, big[0])
        extra[f"{a.entries}-entry map, probe"] = (f"a port open all along: {ms(bk)} (p50); {dk['accepted_on_first_attempt']} of {n} accepted the first attempt; "
                                                  f"first attempt {ms(dk['probe_start_p50_s'])} (p50) after the return")
        rows += [row(f"{a.entries}-entry map: `ports add` returned → port accepts", latk),
                 row(f"{a.entries}-entry map: `ports add` command wall time", cmdk)]
        result.update(available=True, rows=rows, extra=extra)
    except Exception as e:  # noqa: BLE001 - recorded in the report
        log(f"port changes FAILED: {e}")
        result.update(available=True, rows=rows, extra={**extra, "error": str(e)[:500]})
    finally:
        sampler.stop()
        result["edge_rss_mib"] = sampler.peak_kb["edge"] / 1024
        h.stop(probe, grace=1)
        sk.stop(h)
        h.stop(echo, grace=1)
        h.close()
    if result.get("rows"):
        result.setdefault("extra", {})["edge peak RSS during this benchmark"] = f"{result['edge_rss_mib']:.1f} MiB"
    save(a, result)
    print(report.port_changes_md(result))
    return 0


def save(a: argparse.Namespace, result: dict) -> None:
    jp = Path(a.json)
    data = {}
    if jp.exists():
        try:
            data = json.loads(jp.read_text())
        except json.JSONDecodeError:
            data = {}
    data["port_changes"] = result
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(data, indent=1))
    if "results" in data and "env" in data:
        report.write(data, Path(a.out))
    else:
        # no comparison yet: a report with the port-change section only
        Path(a.out).write_text("# Benchmark results\n\n## Port changes (issue 3)\n\n" + report.port_changes_md(result))


if __name__ == "__main__":
    sys.exit(main())

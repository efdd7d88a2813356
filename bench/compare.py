#!/usr/bin/env python3
"""skerry's comparison benchmark: every setup, every figure, in one run.

Usually started by bench/run.sh, which installs the peers and builds
skerry first. Run as root (namespaces, TUN devices).

    python3 bench/compare.py [--runs N] [--quick] [--setups a,b,…]

Per setup and run, in the same namespaces (client → edge → home):
  - TCP throughput, iperf3, 1 and 8 streams, upload and download (-R)
  - highest UDP rate with under 1 % loss (iperf3 -u, bisection over -b)
  - round trip of 64-byte requests on one connection (p50, p99)
  - new connections per second (connect, one request, close)
  - peak RSS and CPU of the edge and home processes
Writes bench/results/latest.json and bench/RESULTS.md (with chart.svg).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import report
import setups as S
from harness import BENCH_DIR, CLK_TCK, Harness, Proc, Sampler, log, tool, wait_until

LOADGEN = str(BENCH_DIR / ".tools" / "bin" / "skb-loadgen")


class Config:
    def __init__(self, a: argparse.Namespace) -> None:
        self.quick = a.quick
        self.runs = a.runs if a.runs else (1 if a.quick else 3)
        self.tcp_secs = a.duration or (3 if a.quick else 8)
        self.udp_secs = 2 if a.quick else 3
        self.udp_probes = 6 if a.quick else 9
        self.rtt_count = a.rtt_count or 2000
        self.conn_count = 2000 if a.quick else 5000
        self.conn_concurrency = 8
        self.perf = [x for x in (a.perf or "").split(",") if x]
        self.perf_figure = a.perf_figure
        self.figures = {x.strip() for x in a.figures.split(",") if x.strip()}


def in_client(h: Harness, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", h.client] + argv, capture_output=True, text=True, timeout=timeout)


class Services:
    """iperf3 and the echo server in the home namespace."""

    def __init__(self, h: Harness, bind: str) -> None:
        self.h, self.bind = h, bind
        self.iperf: Proc | None = None
        self.echo = h.spawn(h.home, [LOADGEN, "serve", f"{bind}:{S.ECHO_PORT}"], "echo-server")
        self.start_iperf()

    def start_iperf(self) -> None:
        if self.iperf:
            self.h.stop(self.iperf, grace=1)
        self.iperf = self.h.spawn(self.h.home, ["iperf3", "-s", "-B", self.bind, "-p", str(S.IPERF_PORT)], "iperf3-server")
        from harness import listening

        wait_until(lambda: listening(self.h, self.h.home, "tcp", S.IPERF_PORT), 10, "iperf3 server")

    def stop(self) -> None:
        for p in (self.iperf, self.echo):
            if p:
                self.h.stop(p, grace=1)


# The iperf3 server takes a moment after a test to take the next one (it
# learns that the last one ended from its client's control connection): a
# test started at once can find it busy, with any setup, direct included. It
# says to try again later, and that is what happens, this many times.
IPERF_BUSY_RETRIES = 3


def iperf_json(h: Harness, argv: list[str], secs: float) -> dict:
    def once() -> dict:
        r = in_client(h, ["iperf3"] + argv + ["-J", "--connect-timeout", "5000"], timeout=secs + 40)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 {' '.join(argv)}: {r.stderr.strip() or r.stdout[-300:]}")

    j = once()
    for _ in range(IPERF_BUSY_RETRIES):
        if "server is busy" not in j.get("error", ""):
            break
        log(f"    iperf3 server busy; trying again ({j['error']})")
        time.sleep(0.5)
        j = once()
    if "error" in j:
        raise RuntimeError(f"iperf3 {' '.join(argv)}: {j['error']}")
    return j


def tcp_test(h: Harness, host: str, cfg: Config, streams: int, reverse: bool) -> dict:
    argv = ["-c", host, "-p", str(S.IPERF_PORT), "-t", str(cfg.tcp_secs), "-O", "1", "-P", str(streams)]
    if reverse:
        argv.append("-R")
    j = iperf_json(h, argv, cfg.tcp_secs + 1)
    end = j["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end.get("sum_sent", {}).get("retransmits"),
    }


def udp_probe(h: Harness, host: str, cfg: Config, mbps: float) -> dict:
    argv = ["-c", host, "-p", str(S.IPERF_PORT), "-u", "-b", f"{mbps:.0f}M", "-l", "1200", "-w", "4M", "-t", str(cfg.udp_secs)]
    j = iperf_json(h, argv, cfg.udp_secs)
    end = j["end"]
    s = end.get("sum", {})
    lost = s.get("lost_percent")
    if "sum_received" in end and end["sum_received"].get("bits_per_second"):
        got = end["sum_received"]["bits_per_second"] / 1e6
        lost = end["sum_received"].get("lost_percent", lost)
    else:
        got = s.get("bits_per_second", 0) / 1e6 * (1 - (lost or 0) / 100)
    if lost is None or not s.get("packets"):
        raise RuntimeError(f"iperf3 UDP at {mbps:.0f} Mbit/s: no loss figure in the report")
    return {"offered_mbps": mbps, "received_mbps": got, "lost_percent": lost, "ok": lost < 1.0}


def udp_search(h: Harness, host: str, cfg: Config, services: Services) -> dict:
    """Highest received rate among probes with < 1 % loss: double, then bisect."""
    probes: list[dict] = []

    def probe(rate: float) -> bool:
        # iperf3 itself can fail a probe: its server may still be ending the
        # last test when the next client connects (through a relay the ends
        # of the last test's streams arrive a moment later), and the UDP
        # test's start is one datagram each way, which a flood just before
        # may have cost. Such a probe is run once more before it counts as
        # all lost.
        p = None
        for attempt in (1, 2):
            try:
                p = udp_probe(h, host, cfg, rate)
                break
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"    udp {rate:.0f}M failed (attempt {attempt}): {e}")
                services.start_iperf()
                time.sleep(1)
                p = {"offered_mbps": rate, "received_mbps": 0.0, "lost_percent": 100.0, "ok": False,
                     "error": str(e)[:200]}
        probes.append(p)
        log(f"    udp -b {rate:.0f}M: {p['received_mbps']:.0f} Mbit/s received, {p['lost_percent']:.2f}% lost")
        return p["ok"]

    lo, hi = 0.0, None
    rate = 250.0
    while len(probes) < cfg.udp_probes:
        if probe(rate):
            lo = rate
            # the sender could not reach the offered rate: that is the ceiling
            if probes[-1]["received_mbps"] < 0.8 * rate or rate >= 16000:
                break
            rate *= 2
        else:
            hi = rate
            break
    if hi is not None:
        if lo == 0.0:
            while len(probes) < cfg.udp_probes and lo == 0.0 and rate > 10:
                rate /= 2
                if probe(rate):
                    lo = rate
                else:
                    hi = rate
        while len(probes) < cfg.udp_probes and lo > 0 and hi / lo > 1.12:
            mid = math.sqrt(lo * hi)
            if probe(mid):
                lo = mid
            else:
                hi = mid
    good = [p["received_mbps"] for p in probes if p["ok"]]
    return {"mbps": max(good) if good else 0.0, "probes": probes}


def loadgen_json(h: Harness, argv: list[str], timeout: float) -> dict:
    r = in_client(h, [LOADGEN] + argv, timeout)
    if r.returncode != 0:
        raise RuntimeError(f"skb-loadgen {' '.join(argv)}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def wait_ready(h: Harness, ep: S.Endpoints, setup: S.Setup) -> None:
    def echo_ok() -> bool:
        for p in setup.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited: {p.log_path.read_text(errors='replace')[-1500:]}")
        return in_client(h, [LOADGEN, "rtt", f"{ep.host}:{S.ECHO_PORT}", "1", "64"], 10).returncode == 0

    wait_until(echo_ok, 40, f"{setup.name}: TCP echo through the path", interval=0.3)
    if ep.udp:
        wait_until(lambda: in_client(h, [LOADGEN, "udpping", f"{ep.host}:{S.ECHO_PORT}"], 5).returncode == 0,
                   30, f"{setup.name}: UDP echo through the path", interval=0.3)


def start_perf(h: Harness, setup: S.Setup, sampler: Sampler, cfg: Config, key: str) -> list:
    """With --perf: `perf record` the setup's edge and home processes during one figure (--perf-figure);
    stopped by finish_perf when the figure is done."""
    if key != cfg.perf_figure or setup.name not in cfg.perf or not tool("perf"):
        return []
    out = []
    for role in ("edge", "home"):
        pids = sampler.trees[role].roots
        if not pids:
            continue
        data = h.scratch / f"perf-{setup.name}-{role}.data"
        p = h.spawn(None, ["perf", "record", "-q", "-F", "499", "-g", "-o", str(data), "-p", ",".join(map(str, pids))],
                    f"perf-{setup.name}-{role}")
        out.append((role, p, data))
    return out


def finish_perf(h: Harness, setup: S.Setup, perf: list) -> None:
    for role, p, data in perf:
        h.stop(p, sig=2, grace=10)
        dest = BENCH_DIR / "results" / f"perf-{setup.name}-{role}.txt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        for sort, suffix in (("dso,symbol", ""), ("comm,dso", "-by-dso")):
            r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                                "-g", "none", "--percent-limit", "0.5"], capture_output=True, text=True, timeout=120)
            dest.with_name(dest.stem + suffix + ".txt").write_text(r.stdout[:200_000] or r.stderr)
        log(f"  perf profile of {setup.name} {role}: {dest}")


def keep_logs(setup: S.Setup, paths: list[Path]) -> None:
    """A figure failed: keep the logs of that setup's processes for a look."""
    dest = BENCH_DIR / "results" / "logs" / f"{setup.name}-{time.strftime('%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.exists():
            shutil.copy(p, dest / p.name)
    log(f"  logs of {setup.name} kept in {dest}")


def measure(h: Harness, setup: S.Setup, cfg: Config) -> dict:
    res: dict = {"errors": [], "cpu": {}, "load_before": os.getloadavg()}
    sampler = Sampler()
    ep = S.Endpoints(host="", service_bind="127.0.0.1")
    services = None
    try:
        bind = S.HOME_IP if setup.name == "direct" else "127.0.0.1"
        services = Services(h, bind)
        t0 = time.monotonic()
        ep = setup.start(h, sampler)
        sampler.start()
        wait_ready(h, ep, setup)
        res["ready_s"] = time.monotonic() - t0
        time.sleep(0.5)

        def timed(key: str, fn):
            c0, w0 = sampler.cpu_ticks(), time.monotonic()
            try:
                v = fn()
            except Exception as e:  # noqa: BLE001 - one failed figure, not the run
                log(f"  {setup.name} {key}: FAILED {e}")
                res["errors"].append(f"{key}: {str(e)[:300]}")
                services.start_iperf()
                return None
            c1, dt = sampler.cpu_ticks(), time.monotonic() - w0
            res["cpu"][key] = {r: (c1.get(r, 0) - c0.get(r, 0)) / CLK_TCK / dt for r in c1}
            return v

        for streams in (1, 8) if "tcp" in cfg.figures else ():
            for rev in (False, True):
                key = f"tcp{streams}_{'down' if rev else 'up'}"
                perf = start_perf(h, setup, sampler, cfg, key)
                v = timed(key, lambda: tcp_test(h, ep.host, cfg, streams, rev))
                finish_perf(h, setup, perf)
                if v:
                    res[key] = v["gbps"]
                    res[key + "_retr"] = v["retransmits"]
                    log(f"  {setup.name} {key}: {v['gbps']:.2f} Gbit/s (retransmits {v['retransmits']})")
        if ep.udp and setup.udp and "udp" in cfg.figures:
            v = timed("udp", lambda: udp_search(h, ep.host, cfg, services))
            if v:
                res["udp_mbps"] = v["mbps"]
                res["udp_probes"] = v["probes"]
                log(f"  {setup.name} udp: {v['mbps']:.0f} Mbit/s under 1% loss")
        v = None
        if "rtt" in cfg.figures:
            perf = start_perf(h, setup, sampler, cfg, "rtt")
            v = timed("rtt", lambda: loadgen_json(h, ["rtt", f"{ep.host}:{S.ECHO_PORT}", str(cfg.rtt_count), "64"], 60))
            finish_perf(h, setup, perf)
        if v:
            res["rtt_p50_us"], res["rtt_p99_us"] = v["p50_us"], v["p99_us"]
            log(f"  {setup.name} rtt: p50 {v['p50_us']:.0f} µs, p99 {v['p99_us']:.0f} µs")
        v = None
        if "conn" in cfg.figures:
            perf = start_perf(h, setup, sampler, cfg, "connrate")
            v = timed(
                "connrate",
                lambda: loadgen_json(
                    h, ["connrate", f"{ep.host}:{S.ECHO_PORT}", str(cfg.conn_count), str(cfg.conn_concurrency), "64"], 120
                ),
            )
            finish_perf(h, setup, perf)
        if v:
            res["conn_per_s"], res["conn_failed"] = v["per_sec"], v["failed"]
            if v["failed"]:
                res["errors"].append(f"connrate: {v['failed']} of {v['count']} failed ({v['first_error']})")
            log(f"  {setup.name} connrate: {v['per_sec']:.0f}/s ({v['failed']} failed)")
    except Exception as e:  # noqa: BLE001 - a setup that cannot start is reported, the others run
        log(f"  {setup.name}: FAILED {e}")
        traceback.print_exc()
        res["errors"].append(f"setup: {str(e)[:500]}")
    finally:
        sampler.stop()
        for role in ("edge", "home"):
            if sampler.has(role):
                res[f"{role}_rss_mib"] = sampler.peak_kb[role] / 1024
                res[f"{role}_anon_mib"] = sampler.peak_anon_kb[role] / 1024
        logs = [p.log_path for p in setup.procs]
        try:
            setup.stop(h)
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"stop: {e}")
        if res["errors"]:
            keep_logs(setup, logs + [h.scratch / "iperf3-server.log"])
        if services:
            services.stop()
    return res


def cpu_use_of_others(secs: float = 1.0) -> tuple[float, list[str]]:
    """How idle the machine is now, and which processes use it, over one
    second: not the load average, which still carries the build that
    run.sh has just done, nor ps's lifetime averages."""
    def ticks() -> dict[int, tuple[str, int]]:
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            out[int(pid)] = (comm, int(fields[11]) + int(fields[12]))
        return out

    def cpu_total() -> tuple[int, int]:
        # user … steal; guest time is already counted in user and nice.
        parts = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        return sum(parts), parts[3] + parts[4]

    t0, i0, p0 = *cpu_total(), ticks()
    time.sleep(secs)
    t1, i1, p1 = *cpu_total(), ticks()
    idle = (i1 - i0) / max(1, t1 - t0)
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    users = sorted(
        ((p1[pid][1] - p0[pid][1], p1[pid][0]) for pid in p1 if pid in p0 and pid != me),
        reverse=True,
    )
    # Per process: percent of one core, as top shows it.
    return idle, [f"{100 * d / hz / secs:.0f}% {comm}" for d, comm in users[:5] if d > 0]


def environment(setups: list[S.Setup]) -> dict:
    def first(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem = f"{int(open('/proc/meminfo').readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    idle, busy = cpu_use_of_others()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "memory": mem,
        "loadavg_start": os.getloadavg(),
        "cpu_idle_at_start": idle,
        "busy_at_start": busy,
        "rustc": first(["rustc", "--version"]),
        "iperf3": first(["iperf3", "--version"]),
        "python": sys.version.split()[0],
        "versions": {s.name: s.version() for s in setups},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, help="runs per setup (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="one short run: a smoke test")
    ap.add_argument("--duration", type=int, help="seconds per TCP test (default 8; 3 with --quick)")
    ap.add_argument("--rtt-count", type=int, help="round trips in the latency figure (default 2000; more "
                    "for a steadier A/B of latency)")
    ap.add_argument("--setups", default=",".join(S.ALL), help=f"comma-separated, from: {','.join(S.ALL)}")
    ap.add_argument("--figures", default="tcp,udp,rtt,conn", help="comma-separated figures to measure, from: "
                    "tcp,udp,rtt,conn (default all; a subset is for quick A/B runs while developing)")
    ap.add_argument("--perf", default="", help="comma-separated setups to profile with perf during one figure "
                    "(reports in bench/results/perf-*.txt)")
    ap.add_argument("--perf-figure", default="tcp1_up", choices=["tcp1_up", "tcp1_down", "tcp8_up", "tcp8_down", "rtt",
                    "connrate"], help="the figure --perf profiles (default tcp1_up)")
    ap.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="the report to write")
    ap.add_argument("--json", default=str(BENCH_DIR / "results" / "latest.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("compare.py: needs root (network namespaces, TUN devices): sudo bench/run.sh", file=sys.stderr)
        return 2
    cfg = Config(a)
    names = [n.strip() for n in a.setups.split(",") if n.strip()]
    unknown = [n for n in names if n not in S.ALL]
    if unknown:
        print(f"unknown setups: {unknown}; known: {S.ALL}", file=sys.stderr)
        return 2
    if not Path(LOADGEN).exists():
        print(f"{LOADGEN} missing: run bench/run.sh (it builds bench/loadgen)", file=sys.stderr)
        return 2
    for t in ("iperf3",):
        if not tool(t):
            print(f"{t} missing: run bench/run.sh (it installs it)", file=sys.stderr)
            return 2

    Harness.sweep_stale()
    h = Harness()
    h.build_topology()
    setups: list[S.Setup] = []
    skipped: dict[str, str] = {}
    for n in names:
        s = S.make(n)
        why = s.missing()
        if why:
            log(f"skipping {n}: {why}")
            skipped[n] = why
            continue
        try:
            s.prepare(h)
        except Exception as e:  # noqa: BLE001
            log(f"skipping {n}: {e}")
            skipped[n] = str(e)
            continue
        setups.append(s)
    env = environment(setups)
    results: dict[str, list[dict]] = {s.name: [] for s in setups}
    started = time.monotonic()
    for r in range(cfg.runs):
        # Every other run goes through the setups backwards (A B C, C B A, …):
        # a machine that speeds up or slows down during the comparison then
        # favours no setup.
        order = setups if r % 2 == 0 else setups[::-1]
        for s in order:
            log(f"run {r + 1}/{cfg.runs}: {s.name}")
            results[s.name].append(measure(h, s, cfg))
    env["loadavg_end"] = os.getloadavg()
    env["duration_s"] = time.monotonic() - started
    data = {
        "config": {
            "runs": cfg.runs,
            "quick": cfg.quick,
            "tcp_secs": cfg.tcp_secs,
            "udp_secs": cfg.udp_secs,
            "udp_datagram": 1200,
            "rtt_count": cfg.rtt_count,
            "rtt_size": 64,
            "conn_count": cfg.conn_count,
            "conn_concurrency": cfg.conn_concurrency,
        },
        "env": env,
        "setups": {s.name: {"label": s.label, "description": s.description} for s in setups},
        "skipped": skipped,
        "results": results,
    }
    jp = Path(a.json)
    jp.parent.mkdir(parents=True, exist_ok=True)
    prev_port_changes = None
    if jp.exists():
        try:
            prev_port_changes = json.loads(jp.read_text()).get("port_changes")
        except (json.JSONDecodeError, OSError):
            pass
    if prev_port_changes:
        data["port_changes"] = prev_port_changes
    jp.write_text(json.dumps(data, indent=1))
    report.write(data, Path(a.out))
    log(f"wrote {jp} and {a.out}")
    print(report.console_table(data))
    h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

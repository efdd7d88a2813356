"""Turns bench/results/latest.json into bench/RESULTS.md and bench/chart.svg."""

from __future__ import annotations

import html
import json
import statistics
import sys
from pathlib import Path

# key, label, unit, higher is better, format
METRICS = [
    ("tcp1_up", "TCP 1 stream, client→home", "Gbit/s", True, "{:.2f}"),
    ("tcp1_down", "TCP 1 stream, home→client (-R)", "Gbit/s", True, "{:.2f}"),
    ("tcp8_up", "TCP 8 streams, client→home", "Gbit/s", True, "{:.2f}"),
    ("tcp8_down", "TCP 8 streams, home→client (-R)", "Gbit/s", True, "{:.2f}"),
    ("tcp1_up_retr", "TCP retransmits, 1 stream up (whole test)", "count", False, "{:.0f}"),
    ("udp_mbps", "UDP, highest rate with <1% loss", "Mbit/s", True, "{:.0f}"),
    ("rtt_p50_us", "Round trip 64 B, p50", "µs", False, "{:.0f}"),
    ("rtt_p99_us", "Round trip 64 B, p99", "µs", False, "{:.0f}"),
    ("conn_per_s", "New connections per second", "conn/s", True, "{:.0f}"),
    ("edge_rss_mib", "Edge peak RSS", "MiB", False, "{:.1f}"),
    ("home_rss_mib", "Home peak RSS", "MiB", False, "{:.1f}"),
    ("edge_anon_mib", "Edge peak anonymous RSS (sampled)", "MiB", False, "{:.1f}"),
    ("home_anon_mib", "Home peak anonymous RSS (sampled)", "MiB", False, "{:.1f}"),
    ("edge_cpu_tcp8_up", "Edge CPU during TCP 8 streams up", "cores", False, "{:.2f}"),
    ("home_cpu_tcp8_up", "Home CPU during TCP 8 streams up", "cores", False, "{:.2f}"),
    ("cpu_per_gbps", "Edge+home CPU per Gbit/s (TCP 1 stream up)", "cores", False, "{:.2f}"),
]


def flatten(run: dict) -> dict:
    """One run's figures under the metric keys."""
    out = {k: run.get(k) for k, *_ in METRICS if k in run}
    cpu = run.get("cpu", {})
    t8 = cpu.get("tcp8_up", {})
    if "edge" in t8:
        out["edge_cpu_tcp8_up"] = t8["edge"]
    if "home" in t8:
        out["home_cpu_tcp8_up"] = t8["home"]
    t1 = cpu.get("tcp1_up", {})
    if run.get("tcp1_up") and t1:
        out["cpu_per_gbps"] = sum(t1.values()) / run["tcp1_up"]
    return {k: v for k, v in out.items() if v is not None}


def medians(data: dict) -> dict[str, dict[str, float]]:
    med: dict[str, dict[str, float]] = {}
    for name, runs in data["results"].items():
        flat = [flatten(r) for r in runs]
        med[name] = {}
        for k, *_ in METRICS:
            vals = [f[k] for f in flat if k in f]
            if vals:
                med[name][k] = statistics.median(vals)
    return med


def fmt(v: float | None, f: str) -> str:
    return "–" if v is None else f.format(v)


def ratio(sk: float | None, other: float | None) -> str:
    if sk is None or other is None or other == 0:
        return ""
    return f"×{sk / other:.2f}"


def targets(med: dict) -> list[tuple[str, str, bool | None]]:
    sk = med.get("skerry", {})

    def get(setup: str, k: str) -> float | None:
        return med.get(setup, {}).get(k)

    rows = []

    def check(text: str, ok: bool | None, detail: str) -> None:
        rows.append((text, detail, ok))

    def cmp(a, b, op):
        if a is None or b is None:
            return None
        return op(a, b)

    for d in ("up", "down"):
        k = f"tcp1_{d}"
        a, b = sk.get(k), get("innisfree-bt", k)
        check(f"TCP 1 stream {d}: ≥5× innisfree-style (boringtun)", cmp(a, b, lambda x, y: x >= 5 * y),
              f"{fmt(a, '{:.2f}')} vs {fmt(b, '{:.2f}')} Gbit/s ({ratio(a, b)})")
        b = get("rathole-noise", k)
        check(f"TCP 1 stream {d}: ≥ rathole-noise", cmp(a, b, lambda x, y: x >= y),
              f"{fmt(a, '{:.2f}')} vs {fmt(b, '{:.2f}')} Gbit/s ({ratio(a, b)})")
    for d in ("up", "down"):
        k = f"tcp8_{d}"
        a, b = sk.get(k), get("rathole-noise", k)
        check(f"TCP 8 streams {d}: ≥ rathole-noise", cmp(a, b, lambda x, y: x >= y),
              f"{fmt(a, '{:.2f}')} vs {fmt(b, '{:.2f}')} Gbit/s ({ratio(a, b)})")
    a, b = sk.get("udp_mbps"), get("rathole-tcp", "udp_mbps")
    check("UDP: ≥1.5× rathole plain", cmp(a, b, lambda x, y: x >= 1.5 * y), f"{fmt(a, '{:.0f}')} vs {fmt(b, '{:.0f}')} Mbit/s ({ratio(a, b)})")
    a, b = sk.get("conn_per_s"), get("rathole-tcp", "conn_per_s")
    check("New connections/s: ≥ rathole plain", cmp(a, b, lambda x, y: x >= y), f"{fmt(a, '{:.0f}')} vs {fmt(b, '{:.0f}')} /s ({ratio(a, b)})")
    for k, lab in (("rtt_p50_us", "p50"), ("rtt_p99_us", "p99")):
        a, b = sk.get(k), get("rathole-noise", k)
        check(f"Latency {lab}: ≤ rathole-noise", cmp(a, b, lambda x, y: x <= y), f"{fmt(a, '{:.0f}')} vs {fmt(b, '{:.0f}')} µs ({ratio(a, b)})")
    for peer in ("rathole-noise", "rathole-tcp"):
        a, b = sk.get("edge_rss_mib"), get(peer, "edge_rss_mib")
        check(f"Edge RSS (peak, includes the 8-stream load): ≤ {peer} server", cmp(a, b, lambda x, y: x <= y),
              f"{fmt(a, '{:.1f}')} vs {fmt(b, '{:.1f}')} MiB ({ratio(a, b)})")
    return rows


def table_md(data: dict, med: dict) -> str:
    names = list(data["results"].keys())
    head = "| figure | unit | better | " + " | ".join(f"`{n}`" for n in names) + " |"
    sep = "|---|---|---|" + "---:|" * len(names)
    lines = [head, sep]
    for k, label, unit, higher, f in METRICS:
        sk = med.get("skerry", {}).get(k)
        cells = []
        for n in names:
            v = med[n].get(k)
            cell = fmt(v, f)
            if n != "skerry" and v is not None and sk is not None:
                cell += f" <sub>{ratio(sk, v)}</sub>"
            if n == "skerry":
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {label} | {unit} | {'higher' if higher else 'lower'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def console_table(data: dict) -> str:
    med = medians(data)
    names = list(data["results"].keys())
    w = max(12, *(len(n) for n in names))
    out = [f"{'figure':44s}" + "".join(f"{n:>{w + 9}s}" for n in names)]
    for k, label, unit, _higher, f in METRICS:
        sk = med.get("skerry", {}).get(k)
        row = f"{(label + ' (' + unit + ')')[:44]:44s}"
        for n in names:
            v = med[n].get(k)
            r = ratio(sk, v) if n != "skerry" else ""
            row += f"{fmt(v, f):>{w}s}{r:>9s}"
        out.append(row)
    out.append("(×R = skerry ÷ that setup; for latency, RSS and CPU lower is better)")
    return "\n".join(out)


COLORS = {
    "skerry": "#d9480f",
    "direct": "#868e96",
    "innisfree-bt": "#1971c2",
    "innisfree-wggo": "#4dabf7",
    "rathole-noise": "#2f9e44",
    "rathole-tcp": "#8ce99a",
    "bore": "#ae3ec9",
}


def chart_svg(data: dict, med: dict) -> str:
    names = list(data["results"].keys())
    shown = [m for m in METRICS if m[0] not in ("home_cpu_tcp8_up", "tcp1_up_retr")]
    cols = 3
    pw, bar_h, gap = 400, 16, 4
    ph = 40 + len(names) * (bar_h + gap) + 10
    rows = (len(shown) + cols - 1) // cols
    W, H = cols * pw + 20, rows * ph + 70
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="10" y="22" font-size="16" font-weight="bold">skerry vs peers, medians of {data["config"]["runs"]} run(s), '
        f'{html.escape(data["env"]["date"])}, {data["env"]["nproc"]} cores, Linux {html.escape(data["env"]["kernel"])}</text>',
        '<text x="10" y="40" fill="#555">bar length ∝ value; ▲ higher is better, ▼ lower is better; – = not measured / not supported</text>',
    ]
    for i, (k, label, unit, higher, f) in enumerate(shown):
        x0, y0 = 10 + (i % cols) * pw, 55 + (i // cols) * ph
        o.append(f'<text x="{x0}" y="{y0 + 14}" font-weight="bold">{"▲" if higher else "▼"} {html.escape(label)} ({unit})</text>')
        vals = [med[n].get(k) for n in names]
        vmax = max([v for v in vals if v is not None] or [1]) or 1
        for j, (n, v) in enumerate(zip(names, vals)):
            y = y0 + 24 + j * (bar_h + gap)
            o.append(f'<text x="{x0 + 95}" y="{y + 12}" text-anchor="end">{html.escape(n)}</text>')
            if v is None:
                o.append(f'<text x="{x0 + 100}" y="{y + 12}" fill="#999">–</text>')
                continue
            bw = max(1.0, (pw - 170) * v / vmax)
            o.append(f'<rect x="{x0 + 100}" y="{y}" width="{bw:.1f}" height="{bar_h}" fill="{COLORS.get(n, "#495057")}"/>')
            o.append(f'<text x="{x0 + 104 + bw:.1f}" y="{y + 12}">{f.format(v)}</text>')
    o.append("</svg>")
    return "\n".join(o)


def port_changes_md(pc: dict | None) -> str:
    if not pc:
        return "Not run yet: `sudo bench/run.sh --port-changes-only` (or a full `sudo bench/run.sh`).\n"
    if not pc.get("available"):
        return f"**Not available in this build**: {pc.get('reason', '')} (measured {pc.get('date', '')}).\n"
    lines = [f"Measured {pc.get('date', '')}, {pc.get('changes', '?')} changes per map size; "
             "time from `home-agent ports add` returning (exit 0) to the public port on the edge accepting a TCP "
             "connection from the client namespace; the `ports add` column is the wall time of the command itself "
             "(process start, admin socket, the edge's answer).", "",
             "| figure | p50 | p99 | max |", "|---|---:|---:|---:|"]
    for row in pc.get("rows", []):
        lines.append(f"| {row['label']} | {row['p50']} | {row['p99']} | {row['max']} |")
    for k, v in pc.get("extra", {}).items():
        lines.append(f"\n- {k}: {v}")
    return "\n".join(lines) + "\n"


def write(data: dict, out: Path) -> None:
    med = medians(data)
    env = data["env"]
    cfg = data["config"]
    svg = out.parent / "chart.svg"
    svg.write_text(chart_svg(data, med))
    names = list(data["results"].keys())
    # Measured over a second before the first test. Older results lack it
    # and are not flagged: their load average still carried run.sh's build.
    idle = env.get("cpu_idle_at_start")
    busy = idle is not None and idle < 0.9
    L = []
    L.append("# Benchmark results: skerry vs the alternatives\n")
    L.append("Written by `bench/compare.py` (run it with `sudo bench/run.sh`; see `bench/README.md`). "
             "Numbers are medians over the runs; `×R` beside a peer's number is **skerry ÷ that peer** "
             "(for throughput and connections higher is better, for latency, RSS and CPU lower is better).\n")
    L.append(f"![chart](chart.svg)\n")
    L.append("## The run\n")
    L.append(f"- date: {env['date']}; {cfg['runs']} run(s) per setup{' (quick: a smoke run with short durations)' if cfg['quick'] else ''}; "
             f"whole comparison took {env.get('duration_s', 0) / 60:.1f} min")
    L.append(f"- machine: {env['nproc']} cores ({env['cpu']}), {env['memory']}, Linux {env['kernel']}")
    L.append(f"- load average at start {env['loadavg_start'][0]:.2f} / {env['loadavg_start'][1]:.2f} / {env['loadavg_start'][2]:.2f}, "
             f"at end {env.get('loadavg_end', [0, 0, 0])[0]:.2f}")
    if idle is not None:
        L.append(f"- CPU idle over one second before the first test: {100 * idle:.0f} %")
    if busy:
        L.append("- **the machine was not idle at the start** (other processes then: "
                 + "; ".join(html.escape(b) for b in env.get("busy_at_start", [])[:5])
                 + "). Absolute numbers are lower and noisier than on an idle machine; ratios within one run are what count.")
    L.append(f"- TCP: iperf3, {cfg['tcp_secs']} s per test after 1 s omitted, 1 and 8 streams, upload and download (`-R`)")
    L.append(f"- UDP: iperf3 `-u -l {cfg['udp_datagram']} -w 4M` (4 MiB socket buffers at both iperf3 ends, so the endpoints are not what drops), {cfg['udp_secs']} s per probe, offered rate doubled from 250 Mbit/s then bisected; "
             "the figure is the highest *received* rate of a probe with < 1 % loss (client → home)")
    L.append(f"- latency: one TCP connection, {cfg['rtt_count']} round trips of {cfg['rtt_size']} B after 100 warm-up ones "
             "(`bench/loadgen`, Rust, TCP_NODELAY)")
    L.append(f"- connections: {cfg['conn_count']} short-lived connections (connect, one 64 B request and its echo, close) "
             f"from {cfg['conn_concurrency']} client threads")
    L.append("- RSS: peak over the setup's whole run (sum of VmRSS of the role's process tree sampled every 100 ms, "
             "and VmHWM of its main processes); peak anonymous RSS: the highest sampled sum of RssAnon "
             "(heap, stacks and buffers, as opposed to the mapped binary and shared libraries), a peak of its own, "
             "not a part of the RSS figure; CPU: utime+stime (and reaped children) of the role's processes during that test")
    L.append("")
    L.append("## Versions\n")
    L.append(f"- {env['rustc']}; {env['iperf3']}; Python {env['python']}")
    for n in names:
        L.append(f"- `{n}`: {env['versions'].get(n, '')}")
    for n, why in data.get("skipped", {}).items():
        L.append(f"- `{n}`: **skipped**: {why}")
    L.append("")
    L.append("## Setups\n")
    for n in names:
        s = data["setups"][n]
        L.append(f"- `{n}` — {s['label']}: {s['description']}")
    L.append("")
    L.append("## Results (medians)\n")
    L.append(table_md(data, med))
    L.append("")
    if "skerry" in med:
        L.append("## Targets of issue 6\n")
        L.append("| target | measured | met |")
        L.append("|---|---|---|")
        for text, detail, ok in targets(med):
            L.append(f"| {text} | {detail} | {'yes' if ok else ('–' if ok is None else '**no**')} |")
        L.append("")
    errs = [(n, i, e) for n, runs in data["results"].items() for i, r in enumerate(runs) for e in r.get("errors", [])]
    if errs:
        L.append("## Errors during the run\n")
        for n, i, e in errs:
            L.append(f"- `{n}` run {i + 1}: {html.escape(e)}")
        L.append("")
    L.append("## Port changes (issue 3)\n")
    L.append(port_changes_md(data.get("port_changes")))
    L.append("## Every run\n")
    L.append("<details><summary>per-run figures</summary>\n")
    for n, runs in data["results"].items():
        for i, r in enumerate(runs):
            f = flatten(r)
            L.append(f"- `{n}` run {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in f.items())
                     + (f", ready in {r['ready_s']:.1f} s" if "ready_s" in r else ""))
    L.append("\n</details>\n")
    out.write_text("\n".join(L))


if __name__ == "__main__":
    p = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    d = json.loads(p.read_text())
    write(d, Path(__file__).parent / "RESULTS.md")
    print(console_table(d))

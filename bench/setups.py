"""The setups compared by the benchmark, each on the same three namespaces.

Each setup starts its edge and home processes, reports which address the
client uses for the iperf3 service (TCP and UDP 5201) and the echo service
(TCP and UDP 5300), and stops them again. The services themselves run on the
home's 127.0.0.1 (on the home's link address for `direct`, which has no
relay) and are started by the caller.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (
    EDGE_HOME_SIDE_IP,
    EDGE_PUBLIC_IP,
    HOME_IP,
    REPO_DIR,
    Harness,
    Proc,
    Sampler,
    listening,
    log,
    run,
    tool,
    version_of,
    wait_until,
)

IPERF_PORT = 5201
ECHO_PORT = 5300


@dataclass
class Endpoints:
    host: str  # what the client dials
    service_bind: str  # where the services listen in the home namespace
    udp: bool = True


class Setup:
    name = "?"
    label = "?"
    udp = True
    description = ""

    def missing(self) -> str | None:
        """Why this setup cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def prepare(self, h: Harness) -> None:
        """Once per benchmark run, before the first start."""

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        raise NotImplementedError

    def stop(self, h: Harness) -> None:
        for p in reversed(self.procs):
            h.stop(p)
        self.procs = []

    procs: list[Proc]

    def __init__(self) -> None:
        self.procs = []

    def _spawn(self, h: Harness, sampler: Sampler, ns: str, argv: list[str], name: str, role: str | None, **kw) -> Proc:
        p = h.spawn(ns, argv, name, role=role, **kw)
        self.procs.append(p)
        if role:
            sampler.add(role, p.pid)
        return p


def _check_alive(procs: list[Proc]) -> None:
    for p in procs:
        if not p.alive():
            tail = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
            raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")


# ---------------------------------------------------------------- direct


class Direct(Setup):
    name = "direct"
    label = "direct (routed, no tunnel)"
    description = "the edge namespace forwards (ip_forward=1) to the home's link address: the limit of the machine"

    def version(self) -> str:
        return "Linux " + os.uname().release

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        h.set_direct_routing(True)
        return Endpoints(host=HOME_IP, service_bind=HOME_IP)

    def stop(self, h: Harness) -> None:
        h.set_direct_routing(False)


# ---------------------------------------------------------------- skerry


MUSL = "x86_64-unknown-linux-musl"


def is_static(path: str) -> bool:
    """An ELF executable without an interpreter (PT_INTERP) is statically linked."""
    with open(path, "rb") as f:
        h = f.read(64)
        phoff, phentsize, phnum = int.from_bytes(h[32:40], "little"), int.from_bytes(h[54:56], "little"), \
            int.from_bytes(h[56:58], "little")
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if int.from_bytes(f.read(4), "little") == 3:
                return False
    return True


class Skerry(Setup):
    name = "skerry"
    label = "skerry"
    description = ("edge-agent and home-agent, release builds (the edge-agent static, for musl, as in the image), "
                   "their real data path (boringtun over TUN, QUIC/mTLS control)")
    NAME = "bench"

    def __init__(self) -> None:
        super().__init__()
        # run.sh --skerry-rev REV builds a committed revision elsewhere and says so here;
        # SKB_SKERRY_BIN_DIR alone (both binaries from one directory) is for quick A/B runs.
        bindir = os.environ.get("SKB_SKERRY_BIN_DIR")
        self.home_bin = str(Path(bindir or REPO_DIR / "target" / "release") / "home-agent")
        # The edge-agent as shipped in the DigitalOcean image: static, musl.
        self.edge_bin = os.environ.get("SKB_SKERRY_EDGE_BIN") or str(
            Path(bindir) / "edge-agent" if bindir else REPO_DIR / "target" / MUSL / "release" / "edge-agent"
        )

    def missing(self) -> str | None:
        if not Path(self.home_bin).exists():
            return f"{self.home_bin} not built (cargo build --release -p home-agent)"
        if not Path(self.edge_bin).exists():
            return f"{self.edge_bin} not built (cargo build --release --target {MUSL} -p edge-agent)"
        return None

    def version(self) -> str:
        v = version_of([self.home_bin, "--version"])
        desc = os.environ.get("SKB_SKERRY_DESC") or run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"], check=False
        ).stdout.strip() + " work tree"
        edge = "static" if is_static(self.edge_bin) else "dynamically linked"
        return f"{v} (git {desc}; edge-agent {edge})"

    def env(self, h: Harness) -> dict[str, str]:
        base = h.scratch / "skerry"
        d = {
            "XDG_STATE_HOME": str(base / "state"),
            "XDG_CONFIG_HOME": str(base / "config"),
            "XDG_RUNTIME_DIR": str(base / "run"),
        }
        for v in d.values():
            Path(v).mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def prepare(self, h: Harness) -> None:
        self.bootstrap = h.scratch / "skerry" / "edge.toml"
        env = self.env(h)
        run(
            [
                self.home_bin,
                "edge-bootstrap",
                "--name",
                self.NAME,
                "--out",
                str(self.bootstrap),
                "--tunnel-edge",
                "198.18.3.1",
                "--tunnel-home",
                "198.18.3.2",
                "--tunnel-prefix",
                "30",
            ],
            env={**os.environ, **env},
        )

    def start_pair(self, h: Harness, sampler: Sampler, specs: list[str]) -> None:
        """Starts edge-agent and home-agent serving `specs`; returns when ports are live."""
        env = self.env(h)
        edge = self._spawn(
            h,
            sampler,
            h.edge,
            [self.edge_bin, "run", "--bootstrap", str(self.bootstrap), "--tun-name", "skbt0"],
            "skerry-edge",
            "edge",
            env=env,
        )
        wait_until(lambda: _check_alive([edge]) or listening(h, h.edge, "udp", 7443), 20, "edge-agent's control port")
        argv = [self.home_bin, "connect", "--edge", f"{EDGE_HOME_SIDE_IP}:7443", "--name", self.NAME]
        for s in specs:
            argv += ["-p", s]
        home = self._spawn(h, sampler, h.home, argv, "skerry-home", "home", env=env, stdout_pipe=True)
        ready = threading.Event()

        def pump() -> None:
            with open(home.log_path, "a") as f:
                for line in home.popen.stdout:  # type: ignore[union-attr]
                    f.write(line.decode(errors="replace"))
                    f.flush()
                    if b"public address:" in line:
                        ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 40
        while not ready.wait(0.2):
            _check_alive([edge, home])
            if time.monotonic() > deadline:
                raise TimeoutError("home-agent never printed 'public address:'")

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        specs = [f"{p}/{port}=127.0.0.1:{port}" for port in (IPERF_PORT, ECHO_PORT) for p in ("tcp", "udp")]
        self.start_pair(h, sampler, specs)
        return Endpoints(host=EDGE_PUBLIC_IP, service_bind="127.0.0.1")

    def stop(self, h: Harness) -> None:
        # home first, with SIGINT (its documented stop), then the edge
        for p in reversed(self.procs):
            h.stop(p, sig=2 if p.name == "skerry-home" else 15, grace=10)
        self.procs = []


# ---------------------------------------------------------------- innisfree-style


class Innisfree(Setup):
    """Userspace WireGuard (TUN on each side) + nginx stream at the edge + socat at home."""

    udp = True

    def __init__(self, impl: str) -> None:
        super().__init__()
        self.impl = impl
        if impl == "boringtun":
            self.name = "innisfree-bt"
            self.label = "innisfree-style (boringtun-cli)"
            self.net = "198.18.4"
        else:
            self.name = "innisfree-wggo"
            self.label = "innisfree-style (wireguard-go)"
            self.net = "198.18.5"
        self.description = (
            f"{'boringtun-cli' if impl == 'boringtun' else 'wireguard-go'} TUN on each side configured with wg, "
            "nginx stream on the edge → home tunnel address, socat at home → 127.0.0.1"
        )

    def wg_bin(self) -> str | None:
        return tool("boringtun-cli") if self.impl == "boringtun" else tool("wireguard-go")

    def missing(self) -> str | None:
        for n, b in (("wg", tool("wg")), ("nginx", tool("nginx")), ("socat", tool("socat")), (self.impl, self.wg_bin())):
            if not b:
                return f"{n} not installed"
        if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists() and "stream" not in version_of(["nginx", "-V"]):
            return "nginx stream module not installed (libnginx-mod-stream)"
        return None

    def version(self) -> str:
        if self.impl == "boringtun":
            v = version_of([self.wg_bin(), "--version"])
        else:
            v = run(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"], check=False).stdout.strip()
            v = f"wireguard-go {v} (Debian)"
        ng = version_of(["nginx", "-v"]).replace("nginx version: ", "")
        so = version_of(["socat", "-V"])
        m = re.search(r"socat version (\S+)", run(["socat", "-V"], check=False).stdout)
        return f"{v}; {ng}; socat {m.group(1) if m else so}"

    def _wg_up(self, h: Harness, sampler: Sampler, ns: str, ifname: str, role: str) -> Proc:
        if self.impl == "boringtun":
            argv = [self.wg_bin(), ifname, "--foreground", "--disable-drop-privileges", "--log", str(h.scratch / f"{ifname}.bt.log")]
        else:
            argv = [self.wg_bin(), "-f", ifname]
        p = self._spawn(h, sampler, ns, argv, f"{self.name}-{role}-wg", role, env={"WG_PROCESS_FOREGROUND": "1"})
        sock = Path(f"/var/run/wireguard/{ifname}.sock")
        wait_until(lambda: _check_alive([p]) or sock.exists(), 15, f"{sock}")
        return p

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        t = h.tag[len("skb-") :]
        key = lambda: run(["wg", "genkey"]).stdout.strip()  # noqa: E731
        pub = lambda k: run(["wg", "pubkey"], input=k).stdout.strip()  # noqa: E731
        ek, hk = key(), key()
        (h.scratch / "wg-e.key").write_text(ek)
        (h.scratch / "wg-h.key").write_text(hk)
        os.chmod(h.scratch / "wg-e.key", 0o600)
        os.chmod(h.scratch / "wg-h.key", 0o600)
        e_if, h_if = f"skb{t}w{self.impl[0]}e", f"skb{t}w{self.impl[0]}h"
        e_ip, h_ip = f"{self.net}.1", f"{self.net}.2"

        self._wg_up(h, sampler, h.edge, e_if, "edge")
        run(["ip", "netns", "exec", h.edge, "wg", "set", e_if, "listen-port", "51820",
             "private-key", str(h.scratch / "wg-e.key"), "peer", pub(hk), "allowed-ips", f"{h_ip}/32"])
        run(["ip", "-n", h.edge, "addr", "add", f"{e_ip}/24", "dev", e_if])
        run(["ip", "-n", h.edge, "link", "set", e_if, "mtu", "1420", "up"])

        self._wg_up(h, sampler, h.home, h_if, "home")
        run(["ip", "netns", "exec", h.home, "wg", "set", h_if, "private-key", str(h.scratch / "wg-h.key"),
             "peer", pub(ek), "endpoint", f"{EDGE_HOME_SIDE_IP}:51820", "allowed-ips", f"{e_ip}/32",
             "persistent-keepalive", "25"])
        run(["ip", "-n", h.home, "addr", "add", f"{h_ip}/24", "dev", h_if])
        run(["ip", "-n", h.home, "link", "set", h_if, "mtu", "1420", "up"])
        # start the handshake now rather than at the first keepalive timer (boringtun waits 25 s)
        run(["ip", "netns", "exec", h.home, tool("skb-loadgen") or "true", "udpping", f"{e_ip}:9"], check=False)

        # home: socat from the tunnel address to the service on 127.0.0.1
        for port in (IPERF_PORT, ECHO_PORT):
            self._spawn(h, sampler, h.home, ["socat", f"TCP4-LISTEN:{port},bind={h_ip},fork,reuseaddr,backlog=1024",
                                             f"TCP4:127.0.0.1:{port}"], f"{self.name}-socat-tcp{port}", "home")
            self._spawn(h, sampler, h.home, ["socat", f"UDP4-LISTEN:{port},bind={h_ip},fork,reuseaddr",
                                             f"UDP4:127.0.0.1:{port}"], f"{self.name}-socat-udp{port}", "home")
        # edge: nginx stream, as innisfree's cloud-init writes it
        conf = h.scratch / f"{self.name}-nginx.conf"
        servers = "\n".join(
            f"    server {{ listen {EDGE_PUBLIC_IP}:{port}{' udp reuseport' if udp else ''}; proxy_pass {h_ip}:{port}; }}"
            for port in (IPERF_PORT, ECHO_PORT)
            for udp in (False, True)
        )
        mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
        conf.write_text(
            (f"load_module {mod};\n" if Path(mod).exists() else "")
            + f"""daemon off;
master_process on;
worker_processes auto;
pid {h.scratch}/{self.name}-nginx.pid;
error_log {h.scratch}/{self.name}-nginx-error.log warn;
events {{ worker_connections 8192; }}
stream {{
{servers}
}}
"""
        )
        ng = self._spawn(h, sampler, h.edge, ["nginx", "-c", str(conf), "-p", str(h.scratch), "-e", str(h.scratch / f"{self.name}-nginx-error.log")],
                         f"{self.name}-nginx", "edge")
        wait_until(lambda: _check_alive([ng]) or listening(h, h.edge, "tcp", ECHO_PORT), 15, "nginx listening")
        return Endpoints(host=EDGE_PUBLIC_IP, service_bind="127.0.0.1")


# ---------------------------------------------------------------- rathole


class Rathole(Setup):
    def __init__(self, transport: str) -> None:
        super().__init__()
        self.transport = transport
        self.name = f"rathole-{transport}"
        self.label = f"rathole ({'noise, encrypted' if transport == 'noise' else 'plain TCP'})"
        self.description = f"rathole server on the edge, client at home, transport {transport}"
        self.bin = tool("rathole")

    def missing(self) -> str | None:
        return None if self.bin else "rathole not installed (cargo install --root bench/.tools rathole)"

    def version(self) -> str:
        out = run([self.bin, "--version"], check=False).stdout
        m = re.search(r"Build Version:\s*(\S+)", out)
        return f"rathole {m.group(1) if m else '?'} (crates.io, default features)"

    def prepare(self, h: Harness) -> None:
        if self.transport != "noise":
            return
        out = run([self.bin, "--genkey"]).stdout
        lines = [l.strip() for l in out.splitlines() if l.strip()]
        keys = {}
        for i, l in enumerate(lines):
            if l.lower().startswith("private key") and i + 1 < len(lines):
                keys["private"] = lines[i + 1]
            if l.lower().startswith("public key") and i + 1 < len(lines):
                keys["public"] = lines[i + 1]
        if len(keys) != 2:
            raise RuntimeError(f"cannot parse `rathole --genkey` output: {out!r}")
        self.keys = keys

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        token = "skb-bench-token-0123456789"
        svc = [(f"{p}{port}", p, port) for port in (IPERF_PORT, ECHO_PORT) for p in ("tcp", "udp")]
        if self.transport == "noise":
            s_tr = f'[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "{self.keys["private"]}"\n'
            c_tr = f'[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "{self.keys["public"]}"\n'
        else:
            s_tr = '[server.transport]\ntype = "tcp"\n'
            c_tr = '[client.transport]\ntype = "tcp"\n'
        server = f'[server]\nbind_addr = "{EDGE_HOME_SIDE_IP}:2333"\ndefault_token = "{token}"\n{s_tr}' + "".join(
            f'[server.services.{n}]\ntype = "{p}"\nbind_addr = "{EDGE_PUBLIC_IP}:{port}"\n' for n, p, port in svc
        )
        client = f'[client]\nremote_addr = "{EDGE_HOME_SIDE_IP}:2333"\ndefault_token = "{token}"\n{c_tr}' + "".join(
            f'[client.services.{n}]\ntype = "{p}"\nlocal_addr = "127.0.0.1:{port}"\n' for n, p, port in svc
        )
        sc, cc = h.scratch / f"{self.name}-server.toml", h.scratch / f"{self.name}-client.toml"
        sc.write_text(server)
        cc.write_text(client)
        s = self._spawn(h, sampler, h.edge, [self.bin, "--server", str(sc)], f"{self.name}-server", "edge")
        wait_until(lambda: _check_alive([s]) or listening(h, h.edge, "tcp", 2333), 15, "rathole server")
        self._spawn(h, sampler, h.home, [self.bin, "--client", str(cc)], f"{self.name}-client", "home")
        return Endpoints(host=EDGE_PUBLIC_IP, service_bind="127.0.0.1")


# ---------------------------------------------------------------- bore


class Bore(Setup):
    name = "bore"
    label = "bore (plain TCP, no UDP)"
    udp = False
    description = "bore server on the edge, one `bore local` per port at home; TCP only, unencrypted"

    def __init__(self) -> None:
        super().__init__()
        self.bin = tool("bore")

    def missing(self) -> str | None:
        return None if self.bin else "bore not installed (cargo install --root bench/.tools bore-cli)"

    def version(self) -> str:
        return version_of([self.bin, "--version"])

    def start(self, h: Harness, sampler: Sampler) -> Endpoints:
        s = self._spawn(h, sampler, h.edge, [self.bin, "server", "--min-port", "5000", "--max-port", "5999",
                                                      "--bind-addr", EDGE_HOME_SIDE_IP, "--bind-tunnels", EDGE_PUBLIC_IP], "bore-server", "edge")
        wait_until(lambda: _check_alive([s]) or listening(h, h.edge, "tcp", 7835), 15, "bore server")
        for port in (IPERF_PORT, ECHO_PORT):
            self._spawn(h, sampler, h.home, [self.bin, "local", str(port), "--local-host", "127.0.0.1", "--to", EDGE_HOME_SIDE_IP,
                                             "--port", str(port)], f"bore-local-{port}", "home")
        return Endpoints(host=EDGE_PUBLIC_IP, service_bind="127.0.0.1", udp=False)


ALL = ["direct", "skerry", "innisfree-bt", "innisfree-wggo", "rathole-noise", "rathole-tcp", "bore"]


def make(name: str) -> Setup:
    return {
        "direct": Direct,
        "skerry": Skerry,
        "innisfree-bt": lambda: Innisfree("boringtun"),
        "innisfree-wggo": lambda: Innisfree("wireguard-go"),
        "rathole-noise": lambda: Rathole("noise"),
        "rathole-tcp": lambda: Rathole("tcp"),
        "bore": Bore,
    }[name]()

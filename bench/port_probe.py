"""Runs inside the client namespace for bench/port_changes.py.

Reads commands on stdin, one per line, and answers each with one line:

    one PORT T0        -> "ok SECONDS" once HOST:PORT accepts a TCP connection
                          (SECONDS = CLOCK_MONOTONIC at that moment - T0), or
                          "timeout SECONDS" after 10 s
    all T0 P1,P2,…     -> the same, once every listed port has accepted one
    closed PORT        -> "ok" if PORT refuses a connection now, else "open"

CLOCK_MONOTONIC is the same clock in every network namespace, so T0 comes
from the orchestrator (taken when `home-agent ports add` returned).
"""

import errno
import socket
import sys
import time

HOST = sys.argv[1]
LIMIT = 10.0


def try_connect(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((HOST, port))
        return True
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, None):
            print(f"# connect {port}: {e}", file=sys.stderr, flush=True)
        return False
    finally:
        s.close()


def wait_open(ports: list[int], t0: float) -> str:
    """Answers "ok ELAPSED ATTEMPTS START" (START: t0 to the first attempt)."""
    left = list(ports)
    attempts = 0
    start = time.monotonic() - t0
    while left:
        attempts += 1
        if try_connect(left[0]):
            left.pop(0)
            continue
        if time.monotonic() - t0 > LIMIT:
            return f"timeout {time.monotonic() - t0:.6f} {len(left)}"
        time.sleep(0.0002)
    return f"ok {time.monotonic() - t0:.6f} {attempts} {start:.6f}"


for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    if parts[0] == "one":
        print(wait_open([int(parts[1])], float(parts[2])), flush=True)
    elif parts[0] == "all":
        print(wait_open([int(p) for p in parts[2].split(",")], float(parts[1])), flush=True)
    elif parts[0] == "closed":
        print("open" if try_connect(int(parts[1])) else "ok", flush=True)
    else:
        print(f"error unknown command {parts[0]}", flush=True)

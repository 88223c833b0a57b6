"""Hosts on this machine, for multi-host runs: network namespaces joined by shaped links (lfnnify/app/testbed.py).

  python scripts/hosts.py up --hosts 2 --rate 1gbit       # create them (root, iproute2); prints each address
  python scripts/hosts.py run 1 -- python3 -c "import socket; print(socket.gethostname())"   # inside host 1
  python scripts/hosts.py shape --rate 100mbit             # change every link's rate (unshaped: --rate none)
  python scripts/hosts.py status                           # addresses, rates and bytes sent
  python scripts/hosts.py down                             # remove everything (also: --stale, killed runs')

Each host is a network namespace with its own loopback and address (10.213.0.1, 10.213.0.2, ...), no default route
(nothing leaves the machine) and its own PID namespace for the commands run in it, which are pinned to its own
core. ``up`` removes what it made if it fails or is interrupted. From Python, ``with Hosts(2, rate="1gbit") as
hosts:`` does the same and always removes them. Without root or iproute2 it refuses in one line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from lfnnify.app import Hosts, TestbedError, missing

TAG = "lfhcli"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2, help="how many hosts (default 2)")
    # --hosts also after the command ("up --hosts 3"), as the examples above write it
    count = argparse.ArgumentParser(add_help=False)
    count.add_argument("--hosts", type=int, default=argparse.SUPPRESS, help="how many hosts (default 2)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[count])
    up.add_argument("--rate", default=None, help="every link's rate, e.g. 1gbit (default: unshaped)")
    shape = sub.add_parser("shape", parents=[count])
    shape.add_argument("--rate", required=True)
    run = sub.add_parser("run", parents=[count])
    run.add_argument("host", type=int)
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("status", parents=[count])
    down = sub.add_parser("down", parents=[count])
    down.add_argument("--stale", action="store_true", help="also remove what killed test runs left")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"hosts.py: {reason}", file=sys.stderr)
        return 2
    hosts = Hosts(args.hosts, tag=TAG)
    try:
        if args.command == "up":
            hosts.rate = None if args.rate in (None, "none") else args.rate
            hosts.up()  # removes what it made if it fails, Ctrl-C included
            for i in range(hosts.count):
                print(f"host{i}: {hosts.names[i]}, {hosts.address(i)} on {hosts.device(i)}, cores {hosts.cores[i]}")
            print(f"links: {hosts.rate or 'unshaped'}" + "".join(f"; {n}" for n in hosts.notes))
        elif args.command == "down":
            hosts.adopt().down()
            removed = Hosts.remove_stale() if args.stale else []
            print("removed the hosts" + (f" and {len(removed)} stale namespaces" if removed else ""))
        else:
            hosts.attach()
            if args.command == "shape":
                hosts.shape(None if args.rate == "none" else args.rate)
                print(f"links: {args.rate}")
            elif args.command == "status":
                for i in range(hosts.count):
                    print(f"host{i}: {hosts.address(i)}, sent {hosts.tx_bytes(i):,} bytes")
            else:
                cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
                return subprocess.run(hosts.command(args.host, cmd), env=hosts.env(args.host)).returncode
    except TestbedError as exc:
        print(f"hosts.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hosts on one Linux machine that share nothing but their link: namespaces joined by shaped veth links.

``with Hosts(2, rate="1gbit") as hosts:`` creates two network namespaces, each with its own loopback and one end of a
veth pair (three or more hosts hang off a bridge in a switch namespace), addressed ``10.213.0.1``, ``10.213.0.2``,
... with no default route, so nothing can leave the machine. Every host's egress is shaped with a token bucket
(``tc ... tbf``); latency would need ``netem``, which is used only where the kernel has it.

``hosts.popen(i, cmd)`` runs a command inside host i: its network namespace, a PID namespace of its own, pinned to
its cores, and a mount and UTS namespace of its own, so that, as on two machines,

- ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are the host's own, and so is its working folder: a file one host writes
  there is invisible to every other host (``hosts.path(i, p)`` says where host i's file ``p`` lies, seen from
  outside, so that a test can read it);
- every host has the same host name (``lfnnify-host``), as containers on two machines often do;
- the rest of the file system (the Python installation, the code, the data) is the same on every host, as on
  machines built from one image; ``shared=[folder, ...]`` makes folders that every host sees as one (a network file
  system), also inside the private folders.

Everything created is removed on exit, also after an error or Ctrl-C; ``Hosts.remove_stale()`` removes what a killed
run left. A testbed never touches another's: creating one whose names exist is refused. Needs root, iproute2
(``ip``, ``tc``) and util-linux (``unshare``, ``taskset``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError

__all__ = ["Hosts", "TestbedError", "missing", "parse_rate", "PREFIX", "HOSTNAME", "PRIVATE"]

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the lfnnify package
# lfnnify's source checkout when it runs from one (installed editable or not), else None (installed from a wheel)
_CHECKOUT = _ROOT if (_ROOT / "pyproject.toml").is_file() else None
PREFIX = "lfh"  # every namespace and link this module creates starts with it (and with the creating process's id)
SUBNET = "10.213.0"
HOSTNAME = "lfnnify-host"  # every host's name: nothing may rely on host names telling machines apart
PRIVATE = ("/var/tmp", "/dev/shm", "/tmp")  # each host's own; /tmp last: the others' backing folders lie in it
WORK = "/tmp/lfnnify-work"  # each host's working folder (inside its own /tmp)


class TestbedError(ConfigError):
    """The machine cannot host the testbed (no root, no iproute2), or a command to build it failed."""


def missing() -> str | None:
    """Why the testbed cannot run here, in one line, or None when it can."""
    if os.geteuid() != 0:
        return "the hosts testbed needs root (network namespaces); run as root, or skip the multi-host runs"
    lacking = [tool for tool in ("ip", "tc", "taskset", "unshare") if shutil.which(tool) is None]
    if lacking:
        return (f"the hosts testbed needs {', '.join(lacking)} (apt-get install iproute2 util-linux); "
                f"bash scripts/setup.sh installs them")
    return None


def parse_rate(rate: str | None) -> int | None:
    """Bits per second of a tc-style rate ("100mbit", "1gbit", "10gbit"); None (unshaped) stays None."""
    if rate in (None, "", "unshaped"):
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", str(rate).lower())
    if not found:
        raise ConfigError(f"link rate {rate!r}: give bits per second as tc writes them, e.g. 100mbit, 1gbit, 10gbit")
    return int(float(found.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[found.group(2)])


def _namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.split()]


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _software() -> list[Path]:
    """The folders of what a host's processes run: this interpreter's prefixes and lfnnify's source checkout."""
    folders = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    if _CHECKOUT is not None:
        folders.append(_CHECKOUT)
    return list(dict.fromkeys(folders))


class Hosts:
    """``count`` hosts on this machine (see the module docstring).

    Args:
        count: hosts, at least 2.
        rate: every host's egress rate (``"1gbit"``), or None for an unshaped link.
        cores: the CPU cores of each host (default: core i for host i, as many as there are).
        latency_ms: one-way delay added with netem where the kernel has it; else skipped with a note.
        tag: the testbed's name (default: from this process's id); a named one outlives the process (the CLI's).
        shared: folders every host sees as one, as a network file system (default: none; each host's /tmp,
            /var/tmp, /dev/shm and working folder are its own; what the hosts run, this Python and lfnnify's
            checkout, every host sees wherever it lies).
    """

    def __init__(self, count: int = 2, *, rate: str | None = None, cores: list[list[int]] | None = None,
                 latency_ms: float | None = None, tag: str | None = None, shared: Sequence[str | Path] = ()):
        reason = missing()
        if reason:
            raise TestbedError(reason)
        if not isinstance(count, int) or count < 2 or count > 200:
            raise ConfigError(f"count={count!r}: a testbed has 2 to 200 hosts")
        available = sorted(os.sched_getaffinity(0))
        self.cores = cores or [[available[i % len(available)]] for i in range(count)]
        if len(self.cores) != count:
            raise ConfigError(f"cores={cores!r}: give one list of cores per host ({count} hosts)")
        self.count, self.rate, self.latency_ms = count, rate, latency_ms
        self.tag = tag or f"{PREFIX}{os.getpid()}"  # a named testbed (the CLI's) outlives the process that made it
        if not re.fullmatch(r"[a-z][a-z0-9]{0,8}", self.tag):
            raise ConfigError(f"tag={self.tag!r}: 1 to 9 lower-case letters and digits, starting with a letter")
        self.names = [f"{self.tag}h{i}" for i in range(count)]
        self.switch = f"{self.tag}sw" if count > 2 else None
        self.shared = [Path(p).absolute() for p in shared]
        # what every host runs, as on machines built from one image: this Python and, run from a source checkout,
        # lfnnify's; where such a folder lies inside a host's own folders (a clone in /tmp), each host sees it too
        self.shared += [f for f in _software() if f not in self.shared and any(Path(p) in f.parents for p in PRIVATE)]
        self.disks = Path(tempfile.gettempdir()) / f"lfnnify-disks-{self.tag}"  # each host's private folders
        self.notes: list[str] = []
        self._up = False
        self._created: list[str] = []  # the namespaces this object made (or adopted): the only ones it removes

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Hosts:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Hosts:
        """Create the namespaces, links, addresses and private folders, and shape the links. Refused, touching
        nothing, where a testbed of the same name exists (another process's, or this one's still running)."""
        taken = [n for n in self._all_names() if n in _namespaces()]
        if taken or self.disks.exists():
            raise TestbedError(
                f"a testbed named {self.tag!r} already exists here ({', '.join(taken) or self.disks}); it may still be "
                f"running a job, so it is left alone. Remove it first (hosts.py down) or use another tag")
        self._up = True  # from here on, down() removes whatever part this call created
        try:
            for i in range(self.count):
                self.wipe(i)
            for name in self._all_names():
                _run("ip", "netns", "add", name)
                self._created.append(name)
                _run("ip", "-n", name, "link", "set", "lo", "up")
            if self.switch:
                _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
                _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                here, there = self.device(i), f"{self.tag}p{i}"
                if self.switch:
                    _run("ip", "link", "add", here, "netns", name, "type", "veth", "peer", "name", there, "netns",
                         self.switch)
                    _run("ip", "-n", self.switch, "link", "set", there, "master", "br0", "up")
                elif i == 0:
                    _run("ip", "link", "add", here, "netns", name, "type", "veth", "peer", "name", self.device(1),
                         "netns", self.names[1])
                _run("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", here)
                _run("ip", "-n", name, "link", "set", here, "up")
            self.shape(self.rate)
        except BaseException:
            self.down()
            raise
        return self

    def attach(self) -> Hosts:
        """Use a testbed an earlier process created with the same ``tag`` and ``count`` (the CLI's ``run``)."""
        if not all(name in _namespaces() for name in self.names):
            raise TestbedError(f"no testbed {self.tag!r} with {self.count} hosts here; create it first (hosts.py up)")
        self._up = True
        return self

    def adopt(self) -> Hosts:
        """Take charge of the testbed of this tag, whatever made it, so that :meth:`down` removes it (the CLI's
        ``down``)."""
        self._up = True
        self._created = [n for n in self._all_names() if n in _namespaces()]
        return self

    def down(self) -> None:
        """Remove every namespace (and with it every link) and the private folders this testbed created. Safe to
        call twice."""
        if not self._up:
            return
        for i, name in enumerate(self.names):
            if name in self._created:
                try:
                    self.kill(i)  # a namespace goes only when its last process does: none may outlive the testbed
                except TestbedError:
                    pass
        for name in self._created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created = []
        shutil.rmtree(self.disks, ignore_errors=True)
        self._up = False

    @staticmethod
    def remove_stale() -> list[str]:
        """Remove the namespaces and private folders of testbeds whose creating process is gone; returns the
        namespaces' names."""
        removed = []
        for name in _namespaces():
            found = re.fullmatch(rf"{PREFIX}(\d+)(h\d+|sw)", name)
            if found and not Path(f"/proc/{found.group(1)}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                removed.append(name)
        for disks in Path(tempfile.gettempdir()).glob(f"lfnnify-disks-{PREFIX}*"):
            found = re.fullmatch(rf"lfnnify-disks-{PREFIX}(\d+)", disks.name)
            if found and not Path(f"/proc/{found.group(1)}").exists():
                shutil.rmtree(disks, ignore_errors=True)
        return removed

    def _all_names(self) -> list[str]:
        return self.names + ([self.switch] if self.switch else [])

    # ------------------------------------------------------------------ each host's own folders

    def _folders(self, i: int) -> dict[str, Path]:
        """Host i's private folders: the path each takes inside the host, and where it lies outside."""
        root = self.disks / f"host{i}"
        return {p: root / p.strip("/").replace("/", "_") for p in PRIVATE}

    def path(self, i: int, inside: str | Path) -> Path:
        """Where host i's file ``inside`` (a path as host i's processes name it; a relative one from its working
        folder) lies, seen from outside the hosts: in host i's own folders when it is inside one, else ``inside``
        itself (the same on every host)."""
        inside = Path(WORK) / inside
        if any(inside == s or s in inside.parents for s in self.shared):
            return inside
        for private, backing in self._folders(i).items():
            if inside == Path(private) or Path(private) in inside.parents:
                return backing / inside.relative_to(private)
        return inside

    def wipe(self, i: int) -> None:
        """Empty host i's private folders (its disk was replaced); the shared folders stay."""
        for folder in self._folders(i).values():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.path(i, WORK).mkdir(parents=True)

    def _mounts(self, i: int) -> str:
        """The shell lines that give host i its own folders and host name (run as root in its new mount and UTS
        namespaces, whose mounts never propagate back): each private folder bound over its path, a shared folder
        inside one bound into it first, at its own path; then into its working folder."""
        q = shlex.quote
        lines = ["set -e", "mount --make-rprivate /"]
        for private, backing in self._folders(i).items():
            for folder in self.shared:
                if Path(private) in folder.parents:
                    target = backing / folder.relative_to(private)
                    lines += [f"mkdir -p {q(str(folder))} {q(str(target))}", f"mount --bind {q(str(folder))} "
                                                                               f"{q(str(target))}"]
            lines.append(f"mount --rbind {q(str(backing))} {q(private)}")
        lines += [f"hostname {HOSTNAME}", f"cd {WORK}", 'exec "$@"']
        return "\n".join(lines)

    # ------------------------------------------------------------------ the links

    def device(self, i: int) -> str:
        """Host i's network interface (its end of the veth link)."""
        return f"{self.tag}e{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def shape(self, rate: str | None) -> None:
        """Shape every host's egress to ``rate`` (None: unshaped). A token bucket: rate, and a burst of 4 ms at that
        rate (at least 64 KiB) so that the bucket holds what the kernel sends between two timer ticks, and a queue of
        up to 500 ms at that rate (a switch's buffer: a shallower one drops a burst of a few MB and TCP backs off)."""
        bits = parse_rate(rate)
        self.rate = rate
        for i, name in enumerate(self.names):
            subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", self.device(i), "root"],
                           capture_output=True)
            if bits is None and not self.latency_ms:
                continue
            if self.latency_ms and self._netem(name, i, bits):
                continue
            if bits is not None:
                burst = max(64 * 1024, bits // 8 // 250)
                _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", self.device(i), "root", "tbf",
                     "rate", f"{bits}bit", "burst", str(burst), "latency", "500ms")

    def _netem(self, name: str, i: int, bits: int | None) -> bool:
        cmd = ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", self.device(i), "root", "netem", "delay",
               f"{self.latency_ms}ms"] + (["rate", f"{bits}bit"] if bits else [])
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return True
        note = f"latency {self.latency_ms} ms skipped: this kernel has no netem qdisc"
        if note not in self.notes:
            self.notes.append(note)
        return False

    def cut(self, i: int) -> None:
        """Take host i's link down (the cable pulled)."""
        _run("ip", "-n", self.names[i], "link", "set", self.device(i), "down")

    def kill(self, i: int) -> list[int]:
        """SIGKILL every process running in host i (the machine lost its power); returns their ids."""
        pids = [int(p) for p in _run("ip", "netns", "pids", self.names[i]).split()]
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return pids

    def tx_bytes(self, i: int) -> int:
        """Bytes host i has sent on its link so far (the interface's own counter)."""
        out = _run("ip", "-n", self.names[i], "-j", "-s", "link", "show", "dev", self.device(i))
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    # ------------------------------------------------------------------ processes

    def command(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` as it runs inside host i: its network namespace, a PID namespace of its own (so that, as on
        separate machines, no host's processes can see or signal another's), its own mount and UTS namespaces (its
        own folders, the common host name), pinned to host i's cores."""
        return ["ip", "netns", "exec", self.names[i], "unshare", "--pid", "--fork", "--mount-proc", "--uts",
                "taskset", "-c", ",".join(map(str, self.cores[i])), "sh", "-c", self._mounts(i), HOSTNAME, *cmd]

    def env(self, i: int, base: dict | None = None) -> dict:
        """The environment of host i's processes: gloo on the host's link, the host named in lfnnify's messages,
        one thread per core of the host, and workers' own stores (what restarts across hosts need)."""
        env = dict(os.environ if base is None else base)
        env.update(GLOO_SOCKET_IFNAME=self.device(i), LFNNIFY_HOST=f"host{i}",
                   OMP_NUM_THREADS=str(len(self.cores[i])),
                   # caches a library might write go to the host's own /tmp, not to a home folder every host shares
                   XDG_CACHE_HOME="/tmp/.cache", MPLCONFIGDIR="/tmp/.matplotlib",
                   # torchrun's restarts across hosts hand the new workers the old ones' addresses when workers share
                   # the rendezvous store (pytorch/pytorch#135712); a store of their own per attempt avoids it
                   TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        if _CHECKOUT is not None:  # lfnnify run from a source checkout, installed or not: each
            # host works in a folder of its own, where ``-m lfnnify...`` finds only what the path names
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(_CHECKOUT), *filter(None, env.get(
                "PYTHONPATH", "").split(os.pathsep))]))
        return env

    def popen(self, i: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env(i))
        return subprocess.Popen(self.command(i, cmd), **kwargs)

    def torchrun(self, i: int, script: list[str], *, port: int, nproc: int = 1, max_restarts: int = 0,
                 rendezvous: str = "static", extra: list[str] = ()) -> list[str]:
        """The torchrun command of host i: ``--nnodes count --node-rank i``, its c10d store on host 0's address.

        ``rendezvous="static"`` (``--master-addr``, ranks in the hosts' order): an agent whose link goes down exits
        once its workers have. ``"c10d"`` (the dynamic rendezvous, what torchrun's restarts across hosts need; host
        0 holds the store, ``is_host``, and each host names its own address, ``--local-addr``, since its host name
        resolves to the machine's outside address): an agent whose link goes down keeps polling its store."""
        import sys

        common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.count), "--nproc-per-node",
                  str(nproc), "--max-restarts", str(max_restarts), "--monitor-interval", "0.5"]
        if rendezvous == "static":
            where = ["--node-rank", str(i), "--master-addr", self.address(0), "--master-port", str(port)]
        elif rendezvous == "c10d":
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.address(0)}:{port}", "--rdzv-id",
                     f"{self.tag}-{port}", "--rdzv-conf", f"is_host={str(i == 0).lower()},join_timeout=60",
                     "--local-addr", self.address(i)]
        else:
            raise ConfigError(f"rendezvous={rendezvous!r} must be 'static' or 'c10d'")
        return [*common, *where, *extra, *script]

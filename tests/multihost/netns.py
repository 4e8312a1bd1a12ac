"""Three hosts on one machine: a network namespace per node, veth links between them, and a delay
proxy per direction standing in for the WAN (tc netem is not available here).

Layout (docs/MESH.md, "Multi-host: three regions in namespaces"):

- namespaces `dmh<pid>a`, `…b`, `…c`, each with lo up and the node's public address on lo
  (203.0.113.1/.2/.3, /32);
- a veth pair per pair of nodes, a /30 each from 192.0.2.0/24 (a-b .1/.2, a-c .5/.6, b-c .9/.10);
  no other interface, so nothing can leave;
- in every namespace the other two nodes' public addresses are on lo too, served by a delay proxy
  (tests/multihost/delayproxy.py) that forwards to that node's link address with half the pair's
  RTT in each direction. Every node therefore reaches every other node's advertised address through
  a proxy with that pair's latency, and a real TCP connection over the pair's veth behind it;
- a partition is the pair's veth set down on both ends (a real drop: the kernel has no route).

DERP clients run in the test process: a thread that entered the node's namespace (setns) opens
the TCP connection to the node's loopback listener, and the event loop takes the socket over.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.status import fetch_unix
from relay_worker.client import DerpClient, DerpClientError, _StreamIO
from relay_worker.handshake import ClientInfo
from relay_worker.keys import PrivateKey
from tests.support import ClusterProcess, wait_until

ROOT = Path(__file__).resolve().parents[2]
NODES = ("a", "b", "c")
REGIONS = {"a": 901, "b": 902, "c": 903}
PUBLIC = {"a": "203.0.113.1", "b": "203.0.113.2", "c": "203.0.113.3"}
#: (x, y) -> (x's address, y's address) on their veth pair
LINKS = {("a", "b"): ("192.0.2.1", "192.0.2.2"), ("a", "c"): ("192.0.2.5", "192.0.2.6"),
         ("b", "c"): ("192.0.2.9", "192.0.2.10")}
#: round-trip times between the regions, ms
RTT_MS = {("a", "b"): 30.0, ("a", "c"): 80.0, ("b", "c"): 150.0}
MESH_PORT = {"a": 7100, "b": 7200, "c": 7300}
ECHO_PORT = 7099  # the others reach each namespace's echo (on ECHO_TARGET) here, through their proxies
ECHO_TARGET = 7098
DERP_PORT = 8080  # each node's DERP listener, on its namespace's loopback
PREFIX = "dmh"
CLONE_NEWNET = 0x40000000


class Unavailable(Exception):
    """Namespaces cannot be made here (not root, no ip); the message says which step failed."""


def pair(x: str, y: str) -> tuple[str, str]:
    return (x, y) if x < y else (y, x)


def one_way_ms(x: str, y: str, rtt: dict[tuple[str, str], float] = RTT_MS) -> float:
    return 0.0 if x == y else rtt[pair(x, y)] / 2


def link_addr(x: str, y: str) -> str:
    """x's address on the x-y link."""
    p = pair(x, y)
    return LINKS[p][0 if p[0] == x else 1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Namespaces left by a test process that was killed: kill what runs in them, delete them."""
    proc = _ip("netns", "list", check=False)
    for line in proc.stdout.splitlines():
        match = re.match(rf"^({PREFIX}(\d+)[a-z])\b", line)
        if match and not _pid_alive(int(match.group(2))):
            _kill_netns_pids(match.group(1))
            _ip("netns", "del", match.group(1), check=False)


def _kill_netns_pids(name: str) -> None:
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _enter_netns(name: str) -> None:
    """Move the calling thread into namespace `name` (only this thread: CLONE_NEWNET is per task)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _connect_blocking(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


class NsNode(ClusterProcess):
    """`cluster up` in namespace `ns`: DERP on the namespace's 127.0.0.1, mesh on 0.0.0.0, advertised
    on the node's public address (which the other namespaces reach through their delay proxies)."""

    def __init__(self, ns: str, name: str, *, workers: int, secret: Path, dead_after: float,
                 join: list[str]) -> None:
        args = ["--node-name", name, "--region-id", str(REGIONS[name]),
                "--mesh-listen", f"0.0.0.0:{MESH_PORT[name]}", "--mesh-advertise", PUBLIC[name],
                "--mesh-secret-file", str(secret), "--node-dead-after", str(dead_after)]
        if join:
            args += ["--join", ",".join(f"{PUBLIC[j]}:{MESH_PORT[j]}" for j in join)]
        super().__init__(*args, workers=workers, port=DERP_PORT)
        self.ns = ns
        self.name = name

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super().command()]

    def serving(self) -> bool:
        return any("DERP cluster serving" in line for line in self.output)

    def pids(self) -> list[int]:
        assert self.proc is not None
        pids = [self.proc.pid]
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids += self.worker_pids()
        return pids

    def kill9(self) -> None:
        """kill -9 the whole node: workers and supervisor, no goodbye to anyone."""
        for pid in reversed(self.pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def varz_of(self, index: int) -> dict[str, Any]:
        return json.loads(fetch_unix(self.run_dir / f"worker-{index}.sock", "/debug/varz", timeout=5))

    def keys(self) -> list[int]:
        return [self.varz_of(i)["directory"]["keys"] for i in range(self.workers)]

    def alive_peers(self) -> list[int]:
        return [self.varz_of(i)["mesh"]["peers_alive"] for i in range(self.workers)]

    def alive_nodes(self, index: int) -> dict[str, int]:
        """node -> how many of its workers worker `index` considers alive."""
        out: dict[str, int] = {}
        for peer in self.varz_of(index)["mesh"]["peers"].values():
            out[peer["node"]] = out.get(peer["node"], 0) + (1 if peer["alive"] else 0)
        return out


@dataclass
class Topology:
    """The namespaces, links and proxies; nodes are started with `start_node`. Context manager: on
    exit (also after a failure) every process it started is stopped and every namespace deleted."""

    workers: int = 2
    dead_after: float = 3.0
    rtt_ms: dict[tuple[str, str], float] = field(default_factory=lambda: dict(RTT_MS))
    tag: str = ""
    nodes: dict[str, NsNode] = field(default_factory=dict)
    proxies: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    executors: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tag = self.tag or f"{PREFIX}{os.getpid()}"
        self.tmp = tempfile.TemporaryDirectory(prefix="derp-multihost-")
        self.secret = Path(self.tmp.name) / "mesh.secret"

    def ns(self, x: str) -> str:
        return f"{self.tag}{x}"

    # -- setup and teardown -------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        try:
            sweep_stale()
            self._build()
            subprocess.run([sys.executable, "-m", "cluster", "keygen", "--out", str(self.secret)], check=True,
                           capture_output=True, timeout=30)
            for x in NODES:
                self._start_proxy(x)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        for x in NODES:
            _ip("netns", "add", self.ns(x))
            self.created.append(self.ns(x))
            _ip("-n", self.ns(x), "link", "set", "lo", "up")
            for y in NODES:  # its own public address, and the others' (served by its proxy)
                _ip("-n", self.ns(x), "addr", "add", f"{PUBLIC[y]}/32", "dev", "lo")
        for x, y in LINKS:
            _ip("-n", self.ns(x), "link", "add", f"to{y}", "type", "veth", "peer", "name", f"to{x}",
                "netns", self.ns(y))
            for here, there in ((x, y), (y, x)):
                _ip("-n", self.ns(here), "addr", "add", f"{link_addr(here, there)}/30", "dev", f"to{there}")
                _ip("-n", self.ns(here), "link", "set", f"to{there}", "up")

    def _start_proxy(self, x: str) -> None:
        routes = []
        for y in NODES:
            if y != x:
                delay = one_way_ms(x, y, self.rtt_ms) / 1000
                routes.append(f"{PUBLIC[y]}:{MESH_PORT[y]}:{self.workers}={link_addr(y, x)}:{delay}")
                routes.append(f"{PUBLIC[y]}:{ECHO_PORT}:1={link_addr(y, x)}:{ECHO_TARGET}:{delay}")
        argv = ["ip", "netns", "exec", self.ns(x), sys.executable, "-m", "tests.multihost.delayproxy",
                "--echo", str(ECHO_TARGET)]
        for route in routes:
            argv += ["--route", route]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.proxies[x] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"delay proxy in {self.ns(x)} did not start: {line}{proc.stdout.read()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        for node in list(self.nodes.values()):
            with contextlib.suppress(Exception):
                node.__exit__()
        for proc in self.proxies.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        for name in self.created:
            _kill_netns_pids(name)  # anything a killed node left behind
            _ip("netns", "del", name, check=False)
        self.created.clear()
        self.tmp.cleanup()

    # -- nodes ---------------------------------------------------------------------------------------

    def start_node(self, x: str, join: list[str] | None = None, wait: bool = True) -> NsNode:
        node = NsNode(self.ns(x), x, workers=self.workers, secret=self.secret, dead_after=self.dead_after,
                      join=join or [])
        self.nodes[x] = node
        node.start(wait=wait)
        return node

    def start_all(self) -> dict[str, NsNode]:
        """All three at once (b and c join through a's public address, so through a proxy)."""
        self.start_node("a", wait=False)
        self.start_node("b", join=["a"], wait=False)
        self.start_node("c", join=["a"], wait=False)
        for node in self.nodes.values():
            wait_until(lambda node=node: node.serving() or node.exited(), timeout=90, what=f"node {node.name} to serve")
            if node.exited():
                raise AssertionError(f"node {node.name} exited early:\n{node.log()}")
        return self.nodes

    # -- the network ---------------------------------------------------------------------------------

    #: how `link(x, y, up=False)` cuts: "drop" (default) loses every frame silently, as a WAN
    #: partition does: each end's neighbour entry for the other points at a MAC nobody has, so
    #: frames leave and are discarded by the far veth (no error to the sender, TCP just
    #: retransmits, new connections' SYNs go unanswered); "down" sets both veth ends down (the
    #: kernel has no route: sends fail at once with ENETUNREACH).
    cut_mode: str = "drop"

    def link(self, x: str, y: str, up: bool) -> None:
        """Cut the x-y link (see cut_mode) or restore it."""
        for here, there in ((x, y), (y, x)):
            dev = f"to{there}"
            if self.cut_mode == "down":
                _ip("-n", self.ns(here), "link", "set", dev, "up" if up else "down")
            elif up:
                _ip("-n", self.ns(here), "neigh", "del", link_addr(there, here), "dev", dev, check=False)
            else:
                _ip("-n", self.ns(here), "neigh", "replace", link_addr(there, here), "lladdr", "02:00:00:00:00:01",
                    "dev", dev, "nud", "permanent")

    # -- clients -------------------------------------------------------------------------------------

    def _executor(self, x: str) -> ThreadPoolExecutor:
        if x not in self.executors:
            self.executors[x] = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{x}", initializer=_enter_netns,
                                                   initargs=(self.ns(x),))
        return self.executors[x]

    async def connect(self, x: str, key: PrivateKey | None = None, timeout: float = 10.0) -> DerpClient:
        """A DERP client of node x, its TCP connection made inside x's namespace."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._executor(x), _connect_blocking, "127.0.0.1", DERP_PORT)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
            writer.write(b"GET /derp HTTP/1.1\r\nHost: derp\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                writer.close()
                raise DerpClientError(f"upgrade refused: {head[:200]!r}")
            client = DerpClient(_StreamIO(reader, writer), key or PrivateKey.generate())
            await client._handshake(ClientInfo(can_ack_pings=True), True)
        return client


    async def echo_rtts(self, x: str, y: str, count: int = 50) -> list[float]:
        """TCP ping-pong (64 bytes) from x's namespace to y's echo through x's proxy: the proxy alone, ms."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(x), _ping, PUBLIC[y], ECHO_PORT, count)


def _ping(host: str, port: int, count: int) -> list[float]:
    out = []
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"p" * 64)
            got = 0
            while got < 64:
                chunk = sock.recv(64 - got)
                if not chunk:
                    raise ConnectionError("echo closed")
                got += len(chunk)
            out.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)
    return out


_counter = itertools.count()


class KeyWatch:
    """Poll every worker of some nodes from threads of their own until a condition on that worker's
    varz holds; record when, relative to `start()`. About every 10 ms: polling faster loads the
    very workers it times."""

    def __init__(self, nodes: list[NsNode], done: Callable[[NsNode, int, dict[str, Any]], bool],
                 timeout: float = 20.0) -> None:
        self.nodes, self.done, self.timeout = nodes, done, timeout
        self.t0 = 0.0
        self.at: dict[tuple[str, int], float] = {}
        self.threads: list[threading.Thread] = []

    def start(self, t0: float | None = None) -> KeyWatch:
        self.t0 = time.monotonic() if t0 is None else t0
        for node in self.nodes:
            for index in range(node.workers):
                thread = threading.Thread(target=self._poll, args=(node, index), daemon=True,
                                          name=f"watch-{next(_counter)}")
                thread.start()
                self.threads.append(thread)
        return self

    def _poll(self, node: NsNode, index: int) -> None:
        deadline = self.t0 + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if self.done(node, index, node.varz_of(index)):
                    self.at[(node.name, index)] = time.monotonic() - self.t0
                    return
            time.sleep(0.01)

    def wait(self) -> dict[tuple[str, int], float]:
        for thread in self.threads:
            thread.join(self.timeout + 5)
        return self.at

    async def result(self) -> dict[tuple[str, int], float]:
        return await asyncio.get_running_loop().run_in_executor(None, self.wait)

    def per_node(self) -> dict[str, float]:
        """node -> when its last worker got there (missing: some worker never did)."""
        out: dict[str, float] = {}
        for node in self.nodes:
            times = [self.at.get((node.name, i)) for i in range(node.workers)]
            if all(t is not None for t in times):
                out[node.name] = max(t for t in times if t is not None)
        return out


@contextlib.contextmanager
def topology(**kwargs: Any) -> Iterator[Topology]:
    with Topology(**kwargs) as topo:
        yield topo

"""Relays for the interop scenarios: our nodes and Tailscale's stock derper, TLS on names in the
namespace's /etc/hosts, every one described by the derpMap `cluster derpmap` prints."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.interop.conftest import tls_files
from tests.interop.harness import NamespacedCluster, NetNS, Proc
from tests.support import free_port, free_port_range, wait_until


def mesh_key_file(where: Path) -> Path:
    """derper's mesh PSK: 64 lowercase hex digits (derper, derpprobe and our nodes read the same file)."""
    path = where / "mesh.key"
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path


@dataclass
class OurNode:
    """One node of ours: `cluster up` flags, which `cluster derpmap` also takes."""

    ns: NetNS
    hostname: str
    ca: trustme.CA | None
    workers: int = 2
    extra: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    stun_port: int = field(default_factory=free_port)
    cluster: NamespacedCluster | None = None

    def __post_init__(self) -> None:
        self.ns.hosts[self.hostname] = "127.0.0.1"
        self.ns.write_hosts()
        self.state_dir = self.ns.workdir / f"state-{self.hostname}"

    @property
    def tls(self) -> bool:
        return self.ca is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.hostname}:{self.port}/derp"

    def flags(self) -> list[str]:
        flags = ["--listen", f"127.0.0.1:{self.port}", "--stun", f"127.0.0.1:{self.stun_port}",
                 "--hostname", self.hostname]
        if self.ca is not None:
            certdir = tls_files(self.ca, self.ns.workdir, self.hostname)
            flags += ["--certmode", "manual", "--certdir", str(certdir)]
        return flags + self.extra

    def start(self, env: dict[str, str] | None = None) -> OurNode:
        cluster = NamespacedCluster(self.ns, *self.flags()[4:], "--log-level", "debug", workers=self.workers,
                                    port=self.port, state_dir=self.state_dir, env=env)
        cluster.stun_port = self.stun_port
        self.cluster = cluster.start()
        return self

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster.tmp.cleanup()
            self.cluster = None


def mesh_flags(name: str, region: int, mesh_port: int, join: list[int]) -> list[str]:
    """Flags that make a node one of a multi-node cluster over our ZeroMQ mesh."""
    flags = ["--node-name", name, "--region-id", str(region), "--mesh-listen", f"127.0.0.1:{mesh_port}",
             "--node-dead-after", "3"]
    if join:
        flags += ["--join", ",".join(f"127.0.0.1:{port}" for port in join)]
    return flags


def mesh_ports(workers: int) -> int:
    return free_port_range(workers)


@dataclass
class StockDerper:
    """Tailscale's derper from the pinned module, TLS in manual cert mode."""

    ns: NetNS
    bins: Path
    hostname: str
    ca: trustme.CA
    mesh_key: Path
    mesh_with: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    stun_port: int = field(default_factory=free_port)
    proc: Proc | None = None

    def __post_init__(self) -> None:
        self.ns.hosts[self.hostname] = "127.0.0.1"
        self.ns.write_hosts()
        self.certdir = tls_files(self.ca, self.ns.workdir, self.hostname)

    @property
    def url(self) -> str:
        return f"https://{self.hostname}:{self.port}/derp"

    def start(self, ca_file: Path) -> StockDerper:
        argv = [self.bins / "derper", "-a", f"127.0.0.1:{self.port}", "-stun-port", str(self.stun_port),
                "-http-port", "-1", "-certmode", "manual", "-certdir", self.certdir, "-hostname", self.hostname,
                "-mesh-psk-file", self.mesh_key, "-c", self.ns.workdir / f"{self.hostname}.json"]
        if self.mesh_with:
            argv += ["-mesh-with", ",".join(self.mesh_with)]
        self.proc = self.ns.start(argv, env={"SSL_CERT_FILE": str(ca_file)}, name=f"derper-{self.hostname}")
        self.proc.wait_line(r"derper: serving on|listening on|serving on", timeout=30)
        # derper logs "serving on" just before it listens: a client started at once can be refused
        probe = ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{self.port}"]
        wait_until(lambda: self.ns.run(probe, check=False).returncode == 0, timeout=30,
                   what=f"derper {self.hostname} to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.ns.procs.remove(self.proc)
            self.proc = None

    def node(self, region: int, name: str) -> dict[str, object]:
        """This derper as a DERPNode (derper prints no map: an operator writes this by hand)."""
        return {"Name": name, "RegionID": region, "HostName": self.hostname, "STUNPort": self.stun_port,
                "DERPPort": self.port}


def regions_config(where: Path, regions: dict[int, list[dict[str, object]]]) -> Path:
    """A TOML config whose [[regions]] describe the given nodes: what an operator feeds `cluster derpmap`."""
    lines: list[str] = []
    for region_id, nodes in regions.items():
        lines += ["[[regions]]", f"region_id = {region_id}", f'code = "r{region_id}"',
                  f'name = "Region {region_id}"', ""]
        for node in nodes:
            lines.append("[[regions.nodes]]")
            for key, value in node.items():
                if isinstance(value, bool):
                    lines.append(f"{key} = {'true' if value else 'false'}")
                elif isinstance(value, int):
                    lines.append(f"{key} = {value}")
                else:
                    lines.append(f'{key} = "{value}"')
            lines.append("")
    path = where / "regions.toml"
    path.write_text("\n".join(lines))
    return path


def node_entry(name: str, hostname: str, port: int, stun_port: int) -> dict[str, object]:
    return {"name": name, "hostname": hostname, "ipv4": "127.0.0.1", "derp_port": port, "stun_port": stun_port}

"""`cluster probe`: check that DERP nodes really relay, not just that their STUN port answers.

`tailscale netcheck` only measures STUN, so a region can look healthy while its DERP port refuses
every client (wrong proxy, closed firewall port, plain HTTP behind an https URL). For each node this
runs, concurrently and each under its own deadline:

  stun   a STUN Binding round trip (latency, the address the node sees us at)
  tls    for https: certificate name (HostName, CertName, or a `sha256-raw:` pin), expiry, chain
  probe  GET /derp/probe, expecting 200
  derp   two throwaway keys connect as probers and one relays a timestamped packet to the other

and, for regions with several nodes, a cross-node check per ordered pair (client on X sends to a
client on Y), which only passes when the nodes mesh. Exit status 1 when any check fails.

Modules: model (targets, checks, reports), targets (from URLs or a derpMap), certs, checks (STUN,
TLS, /derp/probe), relay (DERP through one node and across two), run (all of them), output, command.
"""

from .certs import CertInfo, name_matches, parse_certificate
from .checks import check_http_probe, check_stun, check_tls
from .command import add_subcommand
from .model import Check, MeshReport, NodeReport, ProbeOptions, ProbeUsageError, Target
from .relay import check_derp, check_mesh
from .run import probe_all, probe_node
from .targets import load_derpmap, mesh_pairs, target_from_url, targets_from_derpmap

__all__ = [
    "CertInfo", "Check", "MeshReport", "NodeReport", "ProbeOptions", "ProbeUsageError", "Target", "add_subcommand",
    "check_derp", "check_http_probe", "check_mesh", "check_stun", "check_tls", "load_derpmap", "mesh_pairs",
    "name_matches", "parse_certificate", "probe_all", "probe_node", "target_from_url", "targets_from_derpmap",
]

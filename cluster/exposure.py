"""Whether a node's settings make it relay for anyone who can reach it, for the start-up warning.

derper's default admits every client too; an operator who forgets DERP_VERIFY_CLIENTS runs a relay
for the whole internet without noticing. Saying so once at start costs nothing."""

from __future__ import annotations

import ipaddress
from typing import Any


def _public(host: str) -> bool:
    """An address anyone may reach: every interface (which may include a public one), a global IP,
    or a DNS name (assumed public: that is what names in a derpMap are for)."""
    if host in ("", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return host != "localhost"


def open_relay_warning(values: dict[str, Any], listen_host: str) -> str | None:
    """One line when the node would relay for anyone on a public address, else None: it listens on
    one, or its hostname is one (a loopback listener behind a proxy for derp.example.com is as
    public as the proxy)."""
    if values["admission.verify_clients"] or values["admission.verify_client_url"] \
            or values["admission.allow_keys_file"]:
        return None
    hostname = values["server.hostname"]
    if not _public(listen_host) and not (hostname and _public(hostname)):
        return None
    return (f"{hostname or values['server.listen']} relays for any client that reaches it (no admission is "
            "configured): set DERP_VERIFY_CLIENTS=true (--verify-clients) or --verify-client-url to admit "
            "only your tailnet")

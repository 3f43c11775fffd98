"""Which network interface a training worker's process group binds: the one that holds the node's
cluster address. Left alone, gloo binds the address of the machine's hostname, and where that names
loopback (Debian's /etc/hosts maps the hostname to 127.0.1.1) or an address other nodes cannot route to,
every rank on another node times out connecting ("Gloo connectFullMesh failed ... remote=[127.0.0.1]")."""

from __future__ import annotations

import os

import psutil


def node_interface(ip: str) -> str | None:
    """The network interface that holds ``ip`` on this machine (None: none does)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            return name
    return None


def bind_to_address(ip: str) -> dict[str, str]:
    """Point gloo and NCCL's bootstrap at the interface of ``ip`` (before the process group forms); a
    user's own GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME wins. Returns what it set."""
    name = node_interface(ip)
    chosen = {}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if name and not os.environ.get(var):
            os.environ[var] = chosen[var] = name
    return chosen

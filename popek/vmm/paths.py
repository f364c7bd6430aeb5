"""Which host paths a request may name: the VMM's policy, applied before anything is opened.

Requests name host files (kernels, initrds, disks, firmware, NIC sockets, pcap files,
snapshots; later, migration targets) that the VMM then opens with its own rights. A
caller the VMM does not simply trust (one over TCP, or any with ``--restrict-paths``) may
only name paths inside the policy's roots: the bundled images, the storage of the VMM's
state directory and the ``--allow-path`` directories. A path is resolved first
(symlinks, ``..``) with ``lstat``/``readlink`` only, so checking it opens nothing: a
FIFO, a device or a file the caller must not see stays untouched. Every operation that
takes a host path (migration's targets too, once they exist) calls
:meth:`PathPolicy.check` on it before using it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from popek.machine.config import MachineConfig
from popek.vmm.errors import BadRequest, Forbidden


class PathPolicy:
    """``roots``: the directories requests may reach; ``None``: any absolute path."""

    def __init__(self, roots: Iterable[Path] | None = None) -> None:
        self.roots = None if roots is None else tuple(_resolve(root) for root in roots)

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def check(self, path: str | Path) -> Path:
        """``path`` resolved; BadRequest unless it is absolute, Forbidden unless it lies in
        a root. A path that does not exist yet (a snapshot to write) is resolved as far
        as it exists, so it is judged by the directory it would be created in."""
        if not os.path.isabs(path):
            raise BadRequest(f"{path}: paths must be absolute (the VMM has its own cwd)")
        try:
            resolved = _resolve(path)
        except ValueError:  # a NUL byte: no file has that name
            raise BadRequest(f"{path!r} is not a valid path") from None
        if self.roots is not None and not any(resolved.is_relative_to(r) for r in self.roots):
            shown = f"{path} (resolved: {resolved})" if Path(path) != resolved else str(path)
            raise Forbidden(f"{shown} is outside the directories this VMM allows: "
                            f"{', '.join(map(str, self.roots))}")
        return resolved

    def check_config(self, config: MachineConfig) -> None:
        """Every host path a machine of ``config`` would open."""
        for path in config.host_paths():
            self.check(path)


def _resolve(path: str | Path) -> Path:
    return Path(os.path.realpath(path))

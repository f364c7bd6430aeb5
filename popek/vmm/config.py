"""A machine configuration as JSON: what the API receives and what a snapshot records.

The same plain form travels over the REST API, to worker processes and into
snapshot files, so it is checked in one place: a malformed request is refused
with a message naming the field, before any process is started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from popek.machine.virt import ConfigError, DiskSpec, MachineConfig

_STR_FIELDS = ("append", "bios")
_INT_FIELDS = ("mem", "cpus")


def config_to_json(config: MachineConfig) -> dict[str, Any]:
    return {
        "kernel": str(config.kernel),
        "initrd": str(config.initrd) if config.initrd is not None else None,
        "append": config.append,
        "disks": [{"path": str(d.path), "readonly": d.readonly} for d in config.disks],
        "mem": config.mem,
        "cpus": config.cpus,
        "bios": config.bios,
        "rng": config.rng,
    }


def config_from_json(data: Any) -> MachineConfig:
    """Raises ConfigError naming the first field that is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError("machine configuration must be a JSON object")
    kernel = data.get("kernel")
    if not isinstance(kernel, str) or not kernel:
        raise ConfigError("'kernel' must be the path of a kernel image")
    initrd = data.get("initrd")
    if initrd is not None and not isinstance(initrd, str):
        raise ConfigError("'initrd' must be a path or null")
    config = MachineConfig(kernel=Path(kernel), initrd=Path(initrd) if initrd else None)
    for name in _STR_FIELDS:
        if name in data:
            if not isinstance(data[name], str):
                raise ConfigError(f"'{name}' must be a string")
            setattr(config, name, data[name])
    for name in _INT_FIELDS:
        if name in data:
            if not isinstance(data[name], int) or isinstance(data[name], bool):
                raise ConfigError(f"'{name}' must be an integer")
            setattr(config, name, data[name])
    if "rng" in data:
        config.rng = bool(data["rng"])
    disks = data.get("disks", [])
    if not isinstance(disks, list):
        raise ConfigError("'disks' must be a list")
    for disk in disks:
        if not isinstance(disk, dict) or not isinstance(disk.get("path"), str):
            raise ConfigError("each disk must be an object with a 'path'")
        config.disks.append(DiskSpec(Path(disk["path"]), readonly=bool(disk.get("readonly"))))
    return config

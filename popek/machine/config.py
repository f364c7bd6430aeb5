"""A guest machine's settings, declared once.

Every setting of a machine is a field of :class:`MachineConfig`, and the field's metadata
(:func:`setting`) says how users spell it. From that one declaration come the flags of
``popek run`` and ``popek vm create`` (:func:`add_config_args`, :func:`config_from_args`),
the JSON the API receives, workers are sent and snapshots record (:func:`config_to_json`,
:func:`config_from_json`), and the schema that describes that JSON in docs/openapi.yaml
(:func:`config_schema`). A new setting is one new field; nothing else needs to learn it.

Values that users write as one string (``PATH,ro`` for a disk, QEMU's ``user,hostfwd=...``
for a NIC) are small classes with ``parse`` (the command-line form) and the same fields in
JSON, so the API takes structured objects and the command line takes what QEMU users type.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popek.engine.engine import TIERS

MIN_RAM = 16 << 20
MAX_RAM = 64 << 30
MAX_CPUS = 8
BIOS_NAMES = ("popek", "none", "opensbi")  # --bios values that are not firmware files
# The JSON form of a configuration: 2 since "bios": "none" means no firmware; in 1 it meant
# popek's SBI, which 2 calls "popek". Records that hold configurations say which they hold.
CONFIG_VERSION = 2


class ConfigError(Exception):
    """A machine that cannot be built as asked (the CLI prints it as one line)."""


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``65536K`` or a bare number of MiB (as QEMU's ``-m``)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ConfigError(f"not a memory size: {text!r} (try 256M or 1G)")
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]
    return int(match.group(1)) << shift


def parse_on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ConfigError(f"not on or off: {text!r}")
    return text == "on"


def setting(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 - argparse's word
            flag: str | None = None, metavar: str | None = None,
            parse: Callable[[str], Any] | None = None, choices: tuple[str, ...] | None = None,
            minimum: int | None = None, maximum: int | None = None,
            repeat: bool = False, cli: bool = True, cli_default: str | None = None) -> Any:
    """A dataclass field with what the flag, the JSON checks and the schema need.

    ``flag`` defaults to ``--name``; ``parse`` turns the flag's text into the value (or,
    with ``repeat``, into one element of a list); ``cli=False`` keeps a setting API-only;
    ``cli_default`` is what the help says the default is, when the value alone would not.
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "parse": parse,
            "choices": choices, "minimum": minimum, "maximum": maximum, "repeat": repeat,
            "cli": cli, "cli_default": cli_default}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _option_pairs(text: str, what: str) -> tuple[str, list[tuple[str, str]]]:
    """QEMU's ``head,key=value,key=value`` option syntax (repeated keys allowed)."""
    head, *rest = text.split(",")
    pairs = []
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {text!r}: {item!r} is not key=value")
        pairs.append((key, value))
    return head, pairs


@dataclass
class DiskSpec:
    """A raw image as a virtio-blk disk."""

    path: Path = setting(help="the raw image file")
    readonly: bool = setting(False, help="the guest cannot write it")

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """``PATH`` or ``PATH,ro`` (``PATH,rw``)."""
        path, _, opts = text.partition(",")
        if not path or opts not in ("", "ro", "rw"):
            raise ConfigError(f"--disk {text!r}: use PATH or PATH,ro")
        return cls(Path(path), readonly=opts == "ro")


@dataclass
class HostForward:
    """A host port forwarded to the guest: QEMU's ``hostfwd=tcp:HOSTADDR:HOSTPORT-:GUESTPORT``."""

    host_port: int = setting(help="host port", minimum=1, maximum=65535)
    guest_port: int = setting(help="guest port", minimum=1, maximum=65535)
    protocol: str = setting("tcp", help="tcp or udp", choices=("tcp", "udp"))
    host_addr: str = setting("", help="host IPv4 address to listen on (empty: every address)")

    _SYNTAX = re.compile(r"(tcp|udp)?:([^:]*):(\d+)-([^:]*):(\d+)")

    @classmethod
    def parse(cls, text: str) -> HostForward:
        match = cls._SYNTAX.fullmatch(text)
        if not match:
            raise ConfigError(f"hostfwd={text}: use [tcp|udp]:[HOSTADDR]:HOSTPORT-:GUESTPORT")
        proto, host, host_port, guest_addr, guest_port = match.groups()
        if guest_addr not in ("", "10.0.2.15"):
            raise ConfigError(f"hostfwd={text}: the guest is 10.0.2.15; leave its address out")
        forward = cls(int(host_port), int(guest_port), proto or "tcp", host)
        check(forward, "hostfwd")
        return forward

    def check(self) -> None:
        if self.host_addr:
            try:
                ipaddress.IPv4Address(self.host_addr)
            except ValueError:
                raise ConfigError(f"hostfwd: {self.host_addr!r} is not an IPv4 address") from None

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_addr}:{self.host_port}-:{self.guest_port}"


NIC_TYPES = ("user", "stream", "dgram", "switch")
_NIC_ENDPOINTS = {"stream": ("connect", "listen"), "dgram": ("local", "remote"),
                  "user": (), "switch": ()}
_NIC_SOCKETS = ("connect", "listen", "local", "remote")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def is_inet_address(endpoint: str) -> bool:
    """``HOST:PORT`` (TCP/UDP) rather than a Unix socket path."""
    return re.fullmatch(r"[^/]*:\d+", endpoint) is not None


@dataclass
class NicSpec:
    """A virtio-net NIC and the network it is plugged into (QEMU's ``-nic``)."""

    type: str = setting(help="user (NAT to the host, like QEMU's user networking), stream "
                        "or dgram (QEMU's -netdev stream/dgram framing over a socket), or "
                        "switch (a virtual switch of popek serve)", choices=NIC_TYPES)
    mac: str | None = setting(None, help="the NIC's MAC address (default: 52:54:00:12:34:56 "
                              "and up under popek run, derived from the VM id under the VMM)")
    hostfwd: list[HostForward] = setting([], help="user: host ports forwarded to the guest")
    connect: str | None = setting(None, help="stream: connect to this Unix socket path or "
                                  "HOST:PORT")
    listen: str | None = setting(None, help="stream: listen on this Unix socket path or "
                                 "HOST:PORT and take one peer at a time")
    local: str | None = setting(None, help="dgram: receive on this Unix socket path or "
                                "HOST:PORT")
    remote: str | None = setting(None, help="dgram: send to this Unix socket path or HOST:PORT")
    switch: str | None = setting(None, help="switch: the name of a virtual switch")
    pcap: Path | None = setting(None, help="write every frame the NIC sends and receives "
                                "to this file (pcap, as Wireshark reads)")

    @classmethod
    def parse(cls, text: str) -> NicSpec:
        """``user[,hostfwd=...]...``, ``stream,connect=PATH``, ``dgram,local=..,remote=..``
        or ``switch=NAME``, each with optional ``mac=`` and ``pcap=``."""
        head, pairs = _option_pairs(text, "--nic")
        nic = cls(type="switch", switch=head[len("switch="):]) if head.startswith("switch=") \
            else cls(type=head)
        if nic.type not in NIC_TYPES:
            raise ConfigError(f"--nic {text!r}: use one of {', '.join(NIC_TYPES)} "
                              "(or switch=NAME)")
        for key, value in pairs:
            if key == "hostfwd":
                nic.hostfwd.append(HostForward.parse(value))
            elif key in ("mac", "connect", "listen", "local", "remote", "switch"):
                setattr(nic, key, value)
            elif key == "pcap":
                nic.pcap = Path(value)
            else:
                raise ConfigError(f"--nic {text!r}: unknown option {key!r}")
        check(nic, "--nic")
        return nic

    def endpoints(self) -> dict[str, str]:
        """The socket addresses given: ``{"connect": "/run/x.sock"}`` and the like."""
        return {k: v for k in _NIC_SOCKETS if (v := getattr(self, k))}

    def socket_paths(self) -> list[str]:
        """The endpoints that are Unix socket paths rather than ``HOST:PORT``."""
        return [v for v in self.endpoints().values() if not is_inet_address(v)]

    def check(self) -> None:
        """Raises ConfigError unless the options fit the NIC's type."""
        if self.mac is not None:
            self.mac = self.mac.lower()
            if not _MAC.fullmatch(self.mac) or int(self.mac[:2], 16) & 1:
                raise ConfigError(f"mac={self.mac}: not a unicast MAC address like "
                                  "52:54:00:12:34:56")
        endpoints = _NIC_ENDPOINTS[self.type]
        given = list(self.endpoints())
        if any(k not in endpoints for k in given):
            raise ConfigError(f"NIC type {self.type}: {', '.join(given)} do not apply")
        if self.type == "stream" and len(given) != 1:
            raise ConfigError("NIC type stream needs exactly one of connect= or listen=")
        if self.type == "dgram" and not self.remote:
            raise ConfigError("NIC type dgram needs remote= (and usually local=)")
        if (self.type == "switch") != bool(self.switch):
            raise ConfigError("switch=NAME is the only way to name a switch")
        if self.hostfwd and self.type != "user":
            raise ConfigError("hostfwd= applies to user networking only")


@dataclass
class MachineConfig:
    """What ``popek run`` (or the VMM) asks for; the defaults are QEMU's."""

    kernel: Path | None = setting(None, metavar="PATH", help="kernel: a RISC-V Linux Image "
                                  "or ELF, optionally xz/gzip-compressed",
                                  cli_default="the bundled Linux 6.1")
    initrd: Path | None = setting(None, metavar="PATH", help="initramfs",
                                  cli_default="the bundled one, with the bundled kernel")
    append: str = setting("console=ttyS0", metavar="ARGS", help="kernel command line")
    disks: list[DiskSpec] = setting([], flag="--disk", metavar="PATH[,ro]", repeat=True,
                                    parse=DiskSpec.parse, help="raw image as a virtio-blk "
                                    "disk; repeatable")
    nics: list[NicSpec] = setting([], flag="--nic", metavar="TYPE[,OPTION=VALUE...]",
                                  repeat=True, parse=NicSpec.parse,
                                  help="a virtio-net NIC; repeatable. user[,hostfwd=tcp:"
                                  "[HOSTADDR]:HOSTPORT-:GUESTPORT]... (the guest is "
                                  "10.0.2.15, the host's loopback 10.0.2.2, DNS 10.0.2.3), "
                                  "stream,connect=PATH|listen=PATH, dgram,local=..,remote=.., "
                                  "switch=NAME (popek vm only); options mac=, pcap=FILE")
    mem: int = setting(256 << 20, metavar="SIZE", parse=parse_size, minimum=MIN_RAM,
                       maximum=MAX_RAM, help="guest RAM in bytes; on the command line "
                       "e.g. 256M or 1G", cli_default="256M")
    cpus: int = setting(1, metavar="N", minimum=1, maximum=MAX_CPUS, help="harts")
    bios: str = setting("popek", metavar="popek|none|opensbi|PATH", help="M-mode firmware: "
                        "popek = popek's own SBI in Python (the kernel starts in S-mode), "
                        "none = no firmware, as QEMU's -bios none (the --kernel ELF starts "
                        "in M-mode on every hart), opensbi = Debian's fw_jump.bin, or a "
                        "firmware file")
    rng: bool = setting(True, cli=False, help="a virtio-rng entropy device")
    agent: bool = setting(True, cli=False, help="a virtio console port for popek's guest "
                          "agent (vm exec, vm cp, Machine.exec)")
    balloon: bool = setting(False, metavar="on|off", parse=parse_on_off,
                            help="a virtio-balloon device, after the other virtio devices: "
                            "the guest gives RAM back (popek vm update --balloon SIZE) and "
                            "reports free pages, which the host drops", cli_default="off")
    engine: str | None = setting(None, choices=TIERS, help="highest execution tier",
                                 cli_default="$POPEK_ENGINE, else jit when llvmlite is "
                                 "installed, else translate")

    def check(self) -> None:
        if self.mem % 4096:
            raise ConfigError(f"mem {self.mem} is not a whole number of 4 KiB pages")

    def host_paths(self) -> list[Path]:
        """Every host file this machine opens by name (what a path policy must check)."""
        paths = [p for p in (self.kernel, self.initrd) if p is not None]
        paths += [disk.path for disk in self.disks]
        if self.bios not in BIOS_NAMES:
            paths.append(Path(self.bios))
        for nic in self.nics:
            paths += [Path(v) for v in nic.socket_paths()]
            if nic.pcap is not None:
                paths.append(nic.pcap)
        return paths

    def absolute(self) -> MachineConfig:
        """This configuration with every host path made absolute (for a VMM, whose working
        directory is not the user's)."""
        def fix(path: Any) -> Any:
            return None if path is None else Path(path).absolute()

        nics = []
        for nic in self.nics:
            endpoints = {k: str(fix(v)) if v in nic.socket_paths() else v
                         for k, v in nic.endpoints().items()}
            nics.append(dataclasses.replace(nic, pcap=fix(nic.pcap), **endpoints))
        return dataclasses.replace(
            self, kernel=fix(self.kernel), initrd=fix(self.initrd),
            bios=self.bios if self.bios in BIOS_NAMES else str(fix(self.bios)),
            disks=[dataclasses.replace(d, path=fix(d.path)) for d in self.disks], nics=nics)


def check(obj: Any, where: str = "") -> None:
    """Raises ConfigError naming the first setting of ``obj`` (a declared dataclass, nested
    ones included) outside its declared choices or range, or failing its own ``check``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check(item, f"{path}[{i}]")
        else:
            shown = _size(value) if f.metadata["parse"] is parse_size else repr(value)
            _check_value(f, value, f"{path} {shown}")
    if hasattr(obj, "check"):
        obj.check()


def _check_value(f: dataclasses.Field, value: Any, label: str) -> None:
    """``label`` names the value in the message: ``mem 1M`` from JSON, ``1K`` as typed."""
    meta = f.metadata
    if meta["choices"] and value is not None and value not in meta["choices"]:
        raise ConfigError(f"{label}: use one of {', '.join(meta['choices'])}")
    if meta["minimum"] is not None and not meta["minimum"] <= value <= meta["maximum"]:
        show = _size if meta["parse"] is parse_size else str
        raise ConfigError(f"{label} is impossible: use {show(meta['minimum'])} to "
                          f"{show(meta['maximum'])}")


CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(MachineConfig))


# -- the command line -------------------------------------------------------------------------
def add_config_args(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting. Flags left out leave no attribute, so :func:`config_from_args`
    can tell a default from a choice (``--disk`` given or not, say)."""
    for f in dataclasses.fields(MachineConfig):
        meta = f.metadata
        if not meta["cli"] or f.name in skip:
            continue
        default = meta["cli_default"] or _shown(f.default)
        kwargs: dict[str, Any] = {
            "dest": f.name, "default": argparse.SUPPRESS, "metavar": meta["metavar"],
            "help": f"{meta['help']} ({default})" if default else meta["help"]}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
            del kwargs["metavar"]
        else:
            kwargs["type"] = cli_type(meta["parse"] or _scalar_type(f), f)
        if meta["repeat"]:
            kwargs["action"] = "append"
        parser.add_argument(meta["flag"] or f"--{f.name}", **kwargs)


def _shown(default: Any) -> str:
    if default is dataclasses.MISSING or default is None:
        return ""
    return f'"{default}"' if isinstance(default, str) else str(default)


def _size(n: int) -> str:
    return f"{n >> 30}G" if n >= 1 << 30 and not n % (1 << 30) else f"{n / (1 << 20):g}M"


def _scalar_type(f: dataclasses.Field) -> Callable[[str], Any]:
    return {int: int, Path: Path}.get(_hint(f.name)[0], str)


def cli_type(parse: Callable[[str], Any],
             declared: dataclasses.Field | None = None) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ConfigError, or a value outside the ``declared``
    field's range, becomes a usage error naming the flag."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
            if declared is not None:
                _check_value(declared, value, text)
        except (ConfigError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def config_from_args(args: argparse.Namespace, **defaults: Any) -> MachineConfig:
    """The settings given on the command line over ``defaults`` over the declared ones."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MachineConfig)
             if hasattr(args, f.name)}
    return MachineConfig(**{**defaults, **given})


# -- JSON ---------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _hint(name: str, cls: type = MachineConfig) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a field."""
    hint = _hints(cls)[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], len(args) < len(hint.__args__)
    return hint, False


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_json(config: MachineConfig) -> dict[str, Any]:
    return _to_json(config)


def _from_json(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from JSON, every field checked; ConfigError names
    the first field (``nics[0].hostfwd[1].host_port``) that is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'config'}' must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) in {where or 'the configuration'}: "
                          f"{', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"'{path}' is required")
            continue
        values[f.name] = _value(cls, f, data[f.name], path)
    return cls(**values)


def _value(cls: type, f: dataclasses.Field, raw: Any, path: str) -> Any:
    hint, nullable = _hint(f.name, cls)
    if raw is None:
        if not nullable:
            raise ConfigError(f"'{path}' must not be null")
        return None
    if typing.get_origin(hint) is list:
        if not isinstance(raw, list):
            raise ConfigError(f"'{path}' must be a list")
        item = typing.get_args(hint)[0]
        return [_from_json(item, v, f"{path}[{i}]") for i, v in enumerate(raw)]
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, raw, path)
    expected = {Path: str}.get(hint, hint)
    if not isinstance(raw, expected) or (expected is int and isinstance(raw, bool)):
        raise ConfigError(f"'{path}' must be {_TYPE_NAMES[expected]}")
    if hint is Path and not raw:
        raise ConfigError(f"'{path}' must be a path")
    return Path(raw) if hint is Path else raw


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def config_from_json(data: Any, version: int = CONFIG_VERSION) -> MachineConfig:
    """Raises ConfigError naming the first field that is missing, unknown or wrong.
    ``version`` is the :data:`CONFIG_VERSION` of whoever wrote ``data`` (a snapshot, VM
    record or migration source made by an older popek writes an older one)."""
    if version < 2 and isinstance(data, dict) and data.get("bios", "none") == "none":
        data = {**data, "bios": "popek"}  # its default and its "none" were popek's SBI
    config = _from_json(MachineConfig, data, "")
    check(config)
    return config


# -- the schema -------------------------------------------------------------------------------
_SCHEMA_TYPES = {str: "string", Path: "string", int: "integer", bool: "boolean"}


def _schema(cls: type) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        hint, nullable = _hint(f.name, cls)
        meta = f.metadata
        if typing.get_origin(hint) is list:
            prop: dict[str, Any] = {"type": "array", "items": _schema(typing.get_args(hint)[0])}
        elif dataclasses.is_dataclass(hint):
            prop = _schema(hint)
        else:
            prop = {"type": _SCHEMA_TYPES[hint]}
            if meta["choices"]:
                prop["enum"] = [*meta["choices"], *([None] if nullable else [])]
            if meta["minimum"] is not None:
                prop.update(minimum=meta["minimum"], maximum=meta["maximum"])
        if nullable:
            prop["type"] = [prop["type"], "null"]
        if f.default not in (dataclasses.MISSING, None):
            prop["default"] = f.default
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        prop["description"] = meta["help"] + (
            f" (default: {meta['cli_default']})" if meta["cli_default"] else "")
        props[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": props}
    if required:
        schema["required"] = required
    return schema


def config_schema() -> dict[str, Any]:
    """The JSON Schema of :func:`config_to_json`'s output and :func:`config_from_json`'s input."""
    return _schema(MachineConfig)


# -- Python keyword arguments ---------------------------------------------------------------
def config_from_settings(**settings: Any) -> MachineConfig:
    """A machine from Python keyword arguments named after the settings (``popek.Machine``'s).

    A value may be what the command line takes (``mem="256M"``, ``disks=["x.img,ro"]``,
    ``nics=["user,hostfwd=tcp::8080-:80"]``) or the setting's own type (``mem=256 << 20``,
    a :class:`DiskSpec`, a path). Raises ConfigError naming a setting that is unknown or
    wrong, as the flags would."""
    unknown = sorted(set(settings) - CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; the settings are "
                          f"{', '.join(f.name for f in dataclasses.fields(MachineConfig))}")
    values = {}
    for f in dataclasses.fields(MachineConfig):
        if f.name in settings:
            values[f.name] = _setting_value(f, settings[f.name])
    config = MachineConfig(**values)
    check(config)
    return config


def _setting_value(f: dataclasses.Field, value: Any) -> Any:
    parse = f.metadata["parse"]
    if f.metadata["repeat"]:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{f.name} must be a list (of {f.metadata['metavar']})")
        return [parse(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, str) and parse is not None:
        return parse(value)
    if isinstance(value, str | Path) and _hint(f.name)[0] is Path:
        return Path(value)
    return value

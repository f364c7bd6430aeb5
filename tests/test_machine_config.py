"""Machine settings are declared once: flags, JSON and schema all come from MachineConfig."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jsonschema
import pytest

from popek.machine.config import (
    CONFIG_FIELDS,
    ConfigError,
    DiskSpec,
    HostForward,
    MachineConfig,
    NicSpec,
    add_config_args,
    config_from_args,
    config_from_json,
    config_schema,
    config_to_json,
)


def _everything_set() -> MachineConfig:
    """A configuration whose every field differs from its default."""
    return MachineConfig(
        kernel=Path("/k/Image"), initrd=Path("/k/initrd"), append="console=hvc0 quiet",
        disks=[DiskSpec(Path("/d/a.img")), DiskSpec(Path("/d/b.img"), readonly=True)],
        nics=[NicSpec.parse("user,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp::5353-:53,"
                            "mac=52:54:00:aa:bb:cc,pcap=/tmp/n.pcap"),
              NicSpec.parse("stream,connect=/run/net.sock"),
              NicSpec.parse("dgram,local=127.0.0.1:9000,remote=127.0.0.1:9001"),
              NicSpec.parse("switch=lan")],
        mem=512 << 20, cpus=2, bios="opensbi", rng=False, agent=False, balloon=True,
        engine="interp")


def test_every_field_survives_the_json_round_trip() -> None:
    # The VMM used to drop 'engine' on its way to the worker: every field must travel.
    config = _everything_set()
    for f in dataclasses.fields(MachineConfig):
        assert getattr(config, f.name) != f.default, f"{f.name} is left at its default"
    assert config_from_json(config_to_json(config)) == config


def test_json_matches_the_generated_schema() -> None:
    schema = config_schema()
    jsonschema.validate(config_to_json(_everything_set()), schema)
    jsonschema.validate(config_to_json(MachineConfig()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config_to_json(MachineConfig()), "cpus": 9}, schema)
    assert set(schema["properties"]) == CONFIG_FIELDS


def _flags(*argv: str) -> MachineConfig:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_flags_give_the_same_machine_as_json() -> None:
    config = _flags("--kernel", "/k/Image", "--initrd", "/k/initrd", "--append",
                    "console=hvc0 quiet", "--disk", "/d/a.img", "--disk", "/d/b.img,ro",
                    "--nic", "user,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp::5353-:53,"
                    "mac=52:54:00:AA:BB:CC,pcap=/tmp/n.pcap",
                    "--nic", "stream,connect=/run/net.sock",
                    "--nic", "dgram,local=127.0.0.1:9000,remote=127.0.0.1:9001",
                    "--nic", "switch=lan", "--mem", "512M", "--cpus", "2",
                    "--bios", "opensbi", "--balloon", "on", "--engine", "interp")
    assert config == dataclasses.replace(_everything_set(), rng=True, agent=True)


def test_flags_not_given_keep_the_declared_defaults() -> None:
    assert _flags() == MachineConfig()


@pytest.mark.parametrize("text, message", [
    ("user,hostfwd=tcp::99999-:80", "host_port 99999 is impossible"),
    ("user,hostfwd=tcp:localhost:8080-:80", "not an IPv4 address"),
    ("user,hostfwd=8080:80", "use [tcp|udp]"),
    ("user,hostfwd=sctp::1-:2", "use [tcp|udp]"),
    ("stream", "exactly one of connect= or listen="),
    ("stream,connect=/a,listen=/b", "exactly one of connect= or listen="),
    ("user,connect=/a", "do not apply"),
    ("dgram,local=/a", "needs remote="),
    ("switch=", "switch=NAME"),
    ("tap,ifname=tap0", "use one of user, stream, dgram, switch"),
    ("user,mac=01:00:5e:00:00:01", "not a unicast MAC"),
    ("user,mac=52:54:00:12:34", "not a unicast MAC"),
    ("user,bogus=1", "unknown option 'bogus'"),
    ("user,hostfwd", "is not key=value"),
])
def test_a_wrong_nic_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("|", r"\|")):
        NicSpec.parse(text)


def test_hostfwd_reads_and_writes_qemu_syntax() -> None:
    forward = HostForward.parse("udp:127.0.0.1:5353-:53")
    assert (forward.protocol, forward.host_addr, forward.host_port, forward.guest_port) == \
        ("udp", "127.0.0.1", 5353, 53)
    assert str(HostForward.parse("::2222-10.0.2.15:22")) == "tcp::2222-:22"


@pytest.mark.parametrize("body, message", [
    ({"cpus": "2"}, "'cpus' must be an integer"),
    ({"cpus": True}, "'cpus' must be an integer"),
    ({"cpus": 0}, "cpus 0 is impossible: use 1 to 8"),
    ({"mem": 1 << 20}, "mem 1M is impossible: use 16M to 64G"),
    ({"mem": (64 << 20) + 1}, "whole number of 4 KiB pages"),
    ({"kernel": ""}, "'kernel' must be a path"),
    ({"disks": [{"readonly": True}]}, "'disks\\[0\\].path' is required"),
    ({"disks": {"path": "/x"}}, "'disks' must be a list"),
    ({"nics": [{"type": "user", "hostfwd": [{"host_port": 80}]}]},
     "'nics\\[0\\].hostfwd\\[0\\].guest_port' is required"),
    ({"nics": [{"type": "user", "colour": "red"}]}, "unknown field\\(s\\) in nics\\[0\\]: colour"),
    ({"engine": "fast"}, "engine 'fast': use one of interp, translate, baseline, jit"),
    ({"append": None}, "'append' must not be null"),
    ([], "must be a JSON object"),
])
def test_bad_json_names_the_field(body: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_json(body)


def test_absolute_paths_cover_every_host_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = MachineConfig(kernel=Path("Image"), disks=[DiskSpec(Path("d.img"))],
                           bios="fw.bin",
                           nics=[NicSpec.parse("stream,listen=net.sock,pcap=cap.pcap"),
                                 NicSpec.parse("dgram,local=127.0.0.1:1,remote=peer.sock")])
    absolute = config.absolute()
    assert all(p.is_absolute() for p in absolute.host_paths())
    assert len(absolute.host_paths()) == 6  # kernel, disk, firmware, two sockets, capture
    assert absolute.nics[1].local == "127.0.0.1:1"  # an address, not a path

"""Container images: an OCI image layout or a ``docker save`` tarball, unpacked once.

Both formats are a tar of JSON documents and layer blobs (OCI image spec: an
``index.json`` leading to a manifest, a config and layers; ``docker save``: a
``manifest.json`` naming them). Layers are applied in order into a directory of the
cache named by a hash of the config and every layer's content, so the same image
unpacks once and a forged tarball cannot take another image's place. Unpacking goes
into a private directory renamed into place when complete: runs racing to unpack the
same image each finish, one rename wins, and no run ever sees half an image.

A tarball is untrusted: a member with an absolute path or ``..``, a device node, a
hard link leaving the layer, a path through a symlink, a blob whose hash is not its
name or an image for another architecture is refused with one line, and nothing is
written outside the cache. Whiteouts (``.wh.NAME``, ``.wh..wh..opq``) delete what lower
layers left, as the spec's changeset rules say.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO

ARCHITECTURE = "riscv64"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
JSON_LIMIT = 16 << 20  # bytes of one JSON document at most
CHUNK = 1 << 20


class ImageError(Exception):
    """The tarball is not an image popek can run; the message is one line."""


@dataclass
class ImageSpec:
    """What ``popek container run`` takes from an image."""

    rootfs: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str = ""


def unpack(tarball: str, cache: str) -> ImageSpec:
    """The image in ``tarball``, its root filesystem unpacked in ``cache`` (once)."""
    try:
        outer = tarfile.open(tarball, "r:*")
    except OSError as e:
        raise ImageError(f"{tarball}: {e.strerror}") from None
    except tarfile.TarError:
        raise ImageError(f"{tarball}: not a tar archive (plain or compressed)") from None
    try:
        with outer:
            return _unpack(outer, cache)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ImageError(f"{tarball}: malformed image description ({type(e).__name__}: "
                         f"{e})") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ImageError(f"{tarball}: damaged archive ({e})") from None


def _unpack(outer: tarfile.TarFile, cache: str) -> ImageSpec:
    files = {_clean(m.name): m for m in outer.getmembers() if m.isfile()}
    config_name, layer_names = _manifest(outer, files)
    config_bytes = _read(outer, files, config_name)
    config = _json(config_bytes, config_name)
    _check_platform(config)
    key = hashlib.sha256(config_bytes)
    for name in layer_names:
        key.update(_digest(outer, files, name).encode())
    target = os.path.join(cache, key.hexdigest())
    if not os.path.isdir(target):
        _unpack_layers(outer, files, layer_names, cache, target)
    settings = config.get("config") or {}
    return ImageSpec(rootfs=os.path.join(target, "rootfs"),
                     entrypoint=[str(a) for a in settings.get("Entrypoint") or []],
                     cmd=[str(a) for a in settings.get("Cmd") or []],
                     env=[str(e) for e in settings.get("Env") or []],
                     workdir=str(settings.get("WorkingDir") or ""))


# -- reading the archive --------------------------------------------------------------------
def _manifest(outer: tarfile.TarFile, files: dict[str, tarfile.TarInfo]) -> tuple[str, list[str]]:
    """The config's and layers' member names: from index.json (OCI) or manifest.json."""
    if "index.json" in files:
        manifest = _oci_manifest(outer, files, _json(_read(outer, files, "index.json"),
                                                     "index.json"))
        return _blob(manifest["config"]["digest"]), \
            [_blob(layer["digest"]) for layer in manifest.get("layers", [])]
    if "manifest.json" in files:
        entries = _json(_read(outer, files, "manifest.json"), "manifest.json")
        if not isinstance(entries, list) or len(entries) != 1:
            raise ImageError("manifest.json must describe exactly one image")
        return _clean(entries[0]["Config"]), [_clean(n) for n in entries[0]["Layers"]]
    raise ImageError("neither an OCI image layout (index.json) nor a docker save tarball "
                     "(manifest.json)")


def _oci_manifest(outer: tarfile.TarFile, files: dict[str, tarfile.TarInfo],
                  index: dict, depth: int = 0) -> dict:
    """Follow an index to the riscv64 manifest (indexes may nest)."""
    manifests = index.get("manifests") or []
    if depth > 4 or not manifests:
        raise ImageError("the image index lists no manifest")
    platforms = [m.get("platform", {}).get("architecture") for m in manifests]
    chosen = next((m for m, arch in zip(manifests, platforms, strict=True)
                   if arch == ARCHITECTURE), None)
    if chosen is None:
        known = sorted({a for a in platforms if a})
        if known:
            raise ImageError(f"the image is for {', '.join(known)}, not {ARCHITECTURE}")
        chosen = manifests[0]
    document = _json(_read(outer, files, _blob(chosen["digest"])), chosen["digest"])
    if chosen.get("mediaType") in INDEX_TYPES or "manifests" in document:
        return _oci_manifest(outer, files, document, depth + 1)
    return document


def _check_platform(config: dict) -> None:
    arch, system = config.get("architecture"), config.get("os", "linux")
    if arch != ARCHITECTURE or system != "linux":
        raise ImageError(f"the image is for {system}/{arch}, not linux/{ARCHITECTURE}")


def _blob(digest: str) -> str:
    algorithm, _, value = str(digest).partition(":")
    if algorithm != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef"
                                                            for c in value):
        raise ImageError(f"unsupported digest {str(digest)[:80]}")
    return f"blobs/sha256/{value}"


def _clean(name: str) -> str:
    """A member name without ./ prefixes; absolute names and .. are refused."""
    if name.startswith("/") or ".." in name.split("/"):
        raise ImageError(f"refusing member {name!r}: it points outside the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _member(files: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    member = files.get(name)
    if member is None:
        raise ImageError(f"{name} is missing from the archive")
    return member


def _read(outer: tarfile.TarFile, files: dict[str, tarfile.TarInfo], name: str) -> bytes:
    member = _member(files, name)
    if member.size > JSON_LIMIT:
        raise ImageError(f"{name} is too large for a JSON document")
    data = outer.extractfile(member).read()
    _verify(name, hashlib.sha256(data).hexdigest())
    return data


def _digest(outer: tarfile.TarFile, files: dict[str, tarfile.TarInfo], name: str) -> str:
    """sha256 of a layer's bytes (checked against its name if it is a blob)."""
    stream = outer.extractfile(_member(files, name))
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    _verify(name, digest.hexdigest())
    return digest.hexdigest()


def _verify(name: str, actual: str) -> None:
    if name.startswith("blobs/sha256/") and name.rsplit("/", 1)[1] != actual:
        raise ImageError(f"{name} does not match its digest")


def _json(data: bytes, name: str) -> dict | list:
    try:
        return json.loads(data)
    except ValueError:
        raise ImageError(f"{name}: not valid JSON") from None


# -- applying layers --------------------------------------------------------------------------
def _unpack_layers(outer: tarfile.TarFile, files: dict[str, tarfile.TarInfo],
                   layers: list[str], cache: str, target: str) -> None:
    os.makedirs(cache, exist_ok=True)
    work = os.path.join(cache, f".unpacking-{secrets.token_hex(8)}")
    rootfs = os.path.join(work, "rootfs")
    os.makedirs(rootfs)
    try:
        for name in layers:
            _apply_layer(outer.extractfile(files[name]), rootfs, name)
        try:
            os.rename(work, target)
        except OSError:
            if not os.path.isdir(target):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apply_layer(blob: IO[bytes], rootfs: str, name: str) -> None:
    try:
        layer = tarfile.open(fileobj=blob, mode="r:*")
    except tarfile.TarError:
        raise ImageError(f"layer {name}: not a tar archive (gzip and plain are supported)") \
            from None
    with layer:
        members = layer.getmembers()
        for member in members:
            member.name = _clean(member.name)
            _check_member(member, name)
        for member in members:  # whiteouts hide what lower layers left, first
            base = os.path.basename(member.name)
            if base == OPAQUE:
                _clear(_inside(rootfs, os.path.dirname(member.name)))
            elif base.startswith(WHITEOUT):
                _remove(_inside(rootfs, os.path.join(os.path.dirname(member.name),
                                                     base[len(WHITEOUT):])))
        for member in members:
            if not member.name or os.path.basename(member.name).startswith(WHITEOUT):
                continue
            _extract(layer, member, rootfs)


def _check_member(member: tarfile.TarInfo, layer: str) -> None:
    if member.ischr() or member.isblk():
        raise ImageError(f"layer {layer}: refusing device node {member.name!r}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()
            or member.isfifo()):
        raise ImageError(f"layer {layer}: unsupported member type of {member.name!r}")
    if member.islnk():
        member.linkname = _clean(member.linkname)
    member.mode &= 0o777  # no setuid, setgid or sticky bits from an image
    if member.isdir():
        member.mode |= 0o700  # the cache must stay removable by its owner


def _inside(rootfs: str, relative: str) -> str:
    """``rootfs/relative``, after checking that no directory on the way is a symlink (which
    could lead outside) and creating the missing ones."""
    path = rootfs
    parts = [p for p in relative.split("/") if p]
    for part in parts[:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ImageError(f"refusing {relative!r}: it goes through the symlink {part!r}")
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
        elif not os.path.isdir(path):
            os.unlink(path)
            os.mkdir(path, 0o755)
    return os.path.join(path, parts[-1]) if parts else path


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _clear(directory: str) -> None:
    if os.path.isdir(directory) and not os.path.islink(directory):
        for entry in os.listdir(directory):
            _remove(os.path.join(directory, entry))


def _extract(layer: tarfile.TarFile, member: tarfile.TarInfo, rootfs: str) -> None:
    path = _inside(rootfs, member.name)
    if os.path.lexists(path) and not (member.isdir() and os.path.isdir(path)
                                      and not os.path.islink(path)):
        _remove(path)  # an upper layer's entry replaces the lower one's
    if member.islnk():
        source = _inside(rootfs, member.linkname)
        if not os.path.isfile(source) or os.path.islink(source):
            raise ImageError(f"refusing hard link {member.name!r} to {member.linkname!r}")
        os.link(source, path)
        return
    layer.extract(member, rootfs, set_attrs=not member.issym(), filter="fully_trusted")

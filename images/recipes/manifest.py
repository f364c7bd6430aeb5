#!/usr/bin/env python3
"""Write images/manifest.json: what each committed artifact is and where it came from.

Tests can check an artifact against its sha256 before trusting it, and a reader can
see which Debian source package (and version) and which command produced it.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

IMAGES = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("POPEK_IMAGES_WORK", IMAGES / "work"))


def dpkg_version(pkg: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
    ).stdout


def dsc_version(pkg: str) -> str:
    """Version of an unpacked Debian source package, read from its .dsc."""
    dscs = sorted((WORK / "src").glob(f"{pkg}_*.dsc"))
    if not dscs:
        sys.exit(f"manifest: no .dsc for {pkg} under {WORK / 'src'}")
    for line in dscs[-1].read_text().splitlines():
        if line.startswith("Version: "):
            return line.split(": ", 1)[1]
    sys.exit(f"manifest: no Version in {dscs[-1]}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    gcc = subprocess.run(
        ["riscv64-linux-gnu-gcc", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    toolchain = {
        "gcc-riscv64-linux-gnu": dpkg_version("gcc-riscv64-linux-gnu"),
        "binutils-riscv64-linux-gnu": dpkg_version("binutils-riscv64-linux-gnu"),
        "libc6-dev-riscv64-cross": dpkg_version("libc6-dev-riscv64-cross"),
        "gcc --version": gcc,
    }
    busybox = {"package": "busybox", "version": dsc_version("busybox")}
    lua = {"package": "lua5.4", "version": dsc_version("lua5.4")}
    linux = {"package": "linux-source-6.1", "version": dpkg_version("linux-source-6.1")}
    glibc = {"package": "libc6-dev-riscv64-cross (glibc)", "version": dpkg_version("libc6-dev-riscv64-cross")}
    e2fs = {"package": "e2fsprogs", "version": dpkg_version("e2fsprogs")}

    artifacts = [
        ("programs/busybox", [busybox], "recipes/busybox.sh",
         "static riscv64 busybox, config/busybox.config (Debian's busybox-static config)"),
        ("programs/busybox.links", [busybox], "recipes/busybox.sh",
         "applet install paths, used to create the initramfs symlinks"),
        ("programs/lua", [lua], "recipes/lua.sh", "static Lua 5.4 interpreter, -O2"),
        ("programs/hello-static", [glibc], "recipes/hello.sh", "src/hello.c, static"),
        ("programs/hello-dynamic", [glibc], "recipes/hello.sh",
         "src/hello.c, dynamic, PT_INTERP /lib/ld-linux-riscv64-lp64d.so.1"),
        ("programs/popek-agent", [glibc], "recipes/agent.sh",
         "src/popek-agent.c, static: the guest agent on the virtio console port"),
        ("linux/Image.xz", [linux], "recipes/linux.sh virt",
         "arch/riscv/boot/Image, tinyconfig + config/linux-virt.config, xz -9"),
        ("linux/Image.config", [linux], "recipes/linux.sh virt", "full resolved .config of Image"),
        ("linux/Image-smp.xz", [linux], "recipes/linux.sh virt-smp",
         "arch/riscv/boot/Image, tinyconfig + linux-virt.config + linux-virt-smp.config, xz -9"),
        ("linux/Image-smp.config", [linux], "recipes/linux.sh virt-smp", "full resolved .config of Image-smp"),
        ("linux/initramfs.cpio.gz", [busybox, linux], "recipes/initramfs.sh",
         "newc cpio (kernel usr/gen_init_cpio), gzip -9: busybox + links + src/init"
         " + src/net-up + src/udhcpc.script + programs/popek-agent"),
        ("linux/disk.ext4.xz", [e2fs, lua, glibc], "recipes/disk.sh",
         "16 MiB ext4 (mke2fs -d): README, lua, hello-*, glibc loader + libc; xz -9"),
    ]
    out = []
    for rel, sources, recipe, what in artifacts:
        path = IMAGES / rel
        if not path.exists():
            sys.exit(f"manifest: missing {rel}")
        data = path.read_bytes()
        entry = {
            "path": rel,
            "sha256": sha256(data),
            "size": len(data),
            "description": what,
            "sources": sources,
            "build_command": f"images/{recipe}",
        }
        if rel.endswith(".xz"):
            raw = lzma.decompress(data)
            entry["uncompressed"] = {"sha256": sha256(raw), "size": len(raw)}
        out.append(entry)
    manifest = {
        "generated_by": "images/build.sh (images/recipes/manifest.py)",
        "rebuild": "images/build.sh",
        "source_date_epoch": int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000")),
        "toolchain": toolchain,
        "artifacts": out,
    }
    (IMAGES / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"manifest: {len(out)} artifacts", file=sys.stderr)


if __name__ == "__main__":
    main()

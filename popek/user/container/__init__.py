"""Containers of riscv64 programs: ``popek container run`` on the process VM.

rootfs (path resolution inside the root and bind mounts), namespace (what the
container's processes share: pids, hostname, memory), isolation (the rules a
process follows inside one), image (OCI and docker-save tarballs), cli.
"""

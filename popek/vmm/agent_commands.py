"""``popek vm exec`` and ``popek vm cp``: commands and files through the guest agent.

``exec`` passes its stdin (when it is not a terminal) to the command and exits with the
command's status, its stdout and stderr on its own, byte for byte, as ``docker exec``.
``cp`` copies one file either way; the guest's side is written ``VM:PATH``.
"""

from __future__ import annotations

import argparse
import sys

from popek.api.client import ApiError, Client


async def exec_command(client: Client, args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ApiError("no command: popek vm exec VM -- CMD [ARG...]")
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    result = await client.exec(args.vms, argv, stdin, args.timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    return result.returncode


def _guest_side(spec: str) -> tuple[str, str] | None:
    """``VM:PATH`` as (VM, PATH); None for a host path (one with a / before any colon)."""
    vm, sep, path = spec.partition(":")
    return (vm, path) if sep and vm and "/" not in vm else None


async def cp_command(client: Client, args: argparse.Namespace) -> int:
    source, target = _guest_side(args.source), _guest_side(args.target)
    if (source is None) == (target is None):
        raise ApiError("one side of popek vm cp is VM:PATH, the other a host path")
    if target is not None:
        await client.copy_in(target[0], args.source, target[1])
    else:
        await client.copy_out(source[0], source[1], args.target)
    return 0

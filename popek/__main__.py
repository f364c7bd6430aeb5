"""``python -m popek``: the command line."""

from popek.cli import run

run()

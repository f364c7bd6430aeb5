"""``python -m popek.user PROGRAM [ARGS...]``: the process VM without the main CLI."""

import sys

from popek.user.cli import main

sys.exit(main())

"""``python -m popek``: the command line."""

import sys

from popek.cli import main

sys.exit(main())

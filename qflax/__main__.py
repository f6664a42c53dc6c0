"""``python -m qflax <command>``: the command-line entry point (see qflax/cli.py)."""

import sys

from qflax.cli import main

sys.exit(main())

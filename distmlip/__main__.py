"""``python -m distmlip``: the command line (see ``distmlip.cli``)."""

import sys

from .cli import main

sys.exit(main())

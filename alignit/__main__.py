"""``python -m alignit``: the command line (``alignit.cli``)."""

import sys

from .cli import main

sys.exit(main())

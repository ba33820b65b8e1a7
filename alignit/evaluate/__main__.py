"""``python -m alignit.evaluate``: the same as ``alignit evaluate``."""

import sys

from .cli import main

sys.exit(main())

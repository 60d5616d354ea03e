"""``python -m penctl``: the same as the ``penctl`` console script."""

import sys

from penctl.cli import main

sys.exit(main())

"""``python -m numgpt`` is the same as the ``numgpt`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m metalora`` is the ``metalora`` command."""

import sys

from .cli import main

sys.exit(main())

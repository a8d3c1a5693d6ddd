"""``python -m otseg``: the ``otseg`` command (see ``otseg.cli``)."""

import sys

from .cli import main

sys.exit(main())

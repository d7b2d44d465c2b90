"""``python -m asgi_delegation``: the same as the ``asgi-delegation`` command."""

import sys

from .cli import main

sys.exit(main())

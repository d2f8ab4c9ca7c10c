"""``python -m lazytensor_server``: the same as ``lazytensor serve``."""

import sys

from .app import main

sys.exit(main())

"""``python -m certwatchd``."""

import sys

from certwatchd.cli import main

sys.exit(main())

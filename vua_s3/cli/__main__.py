"""``python -m vua_s3.cli``."""

import sys

from .main import main

sys.exit(main())

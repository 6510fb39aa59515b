"""``python -m rdpo.report RUN_DIR [RUN_DIR ...] [--out PATH]``."""

import sys

from rdpo.report import main

sys.exit(main())

"""``python -m runtime.cli``: the stasis CLI."""

import sys

from runtime.cli.main import main

sys.exit(main())

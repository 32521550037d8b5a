"""`python -m vitrank` runs the command line."""

from __future__ import annotations

import sys

from vitrank.cli import main

sys.exit(main())

"""`python -m semrank.cli`: the same as the `semrank` command."""

import sys

from semrank.cli import main

sys.exit(main())

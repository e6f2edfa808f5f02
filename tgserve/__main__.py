"""`python -m tgserve` is the `tgserve` command."""

import sys

from tgserve.cli import main

sys.exit(main())

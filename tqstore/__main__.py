"""`python -m tqstore ...`: the same as the `tqstore` command."""

import sys

from tqstore.cli import main

sys.exit(main())

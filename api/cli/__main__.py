"""`python -m api.cli …`: the same as the `safehold` command."""

import sys

from api.cli.launcher import main

sys.exit(main())

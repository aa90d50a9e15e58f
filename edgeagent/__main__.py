"""`python -m edgeagent` is the `edgeagent` command."""

import sys

from edgeagent.cli import main

sys.exit(main())

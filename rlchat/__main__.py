"""``python -m rlchat``: the same command line as the ``rlchat`` script."""

import sys

from rlchat.cli import main

sys.exit(main())

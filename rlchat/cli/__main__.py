"""``python -m rlchat.cli``: the same command line as ``python -m rlchat`` and the ``rlchat`` script."""

import sys

from rlchat.cli.parser import main

sys.exit(main())

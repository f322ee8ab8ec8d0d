"""`python -m server` from a checkout: the server lives in warmturn/server/ (`python -m warmturn.server`)."""

import sys

from warmturn.server.__main__ import main

sys.exit(main())

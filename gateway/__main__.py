"""`python -m gateway`: run the gateway."""

import sys

from gateway.server import main

sys.exit(main())

"""`python -m services.auth`: run the auth/quota service."""

import sys

from services.auth.server import main

sys.exit(main())

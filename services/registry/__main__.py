"""`python -m services.registry`: run the model registry."""

import sys

from services.registry.server import main

sys.exit(main())

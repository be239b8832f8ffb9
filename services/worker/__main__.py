"""`python -m services.worker`: run one inference worker."""

import sys

from services.worker.server import main

sys.exit(main())

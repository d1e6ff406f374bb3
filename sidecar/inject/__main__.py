"""``python -m sidecar.inject intercept-ca STATE_DIR CERT_OUT``: the injected CA init step."""

import logging
import sys

from sidecar.inject.webhook import main

logging.basicConfig(level=logging.INFO)
sys.exit(main(sys.argv[1:]))

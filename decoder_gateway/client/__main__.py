"""``python -m decoder_gateway.client``: the command line (:mod:`decoder_gateway.client.cli`)."""

import sys

from decoder_gateway.client.cli import main

sys.exit(main())

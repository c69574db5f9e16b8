import sys

from batch_gateway.client.cli import main

sys.exit(main())

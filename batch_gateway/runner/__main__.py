"""`python -m batch_gateway.runner --batch-id ID`: run one batch (the same as `batch-gateway runner`)."""

import sys

from batch_gateway.cli import entry

if __name__ == "__main__":
    entry(["runner", *sys.argv[1:]])

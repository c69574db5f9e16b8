"""`python -m batch_gateway.runner --batch-id ID`: run one batch (the same as `batch-gateway runner`)."""

from batch_gateway.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["runner", *__import__("sys").argv[1:]]))

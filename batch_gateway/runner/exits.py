"""What a runner's exit code tells the executor that started it (imported by both; keep it free of imports).

- `EXIT_OK`: the batch is terminal (or vanished): nothing more to do.
- `EXIT_CRASHED`: a bug or an unexpected error; restarted with backoff, and after a few the batch is given up.
- `EXIT_LEASE_HELD`: another live runner owns the batch. Not a crash: nothing to do while its lease lives.
- `EXIT_RETRY_LATER`: stopped by a signal, or storage stayed down longer than `--storage-retry-seconds`. Not a crash:
  the results are in checkpoints, and the next reconcile pass starts a runner again.
"""

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_LEASE_HELD = 3
EXIT_RETRY_LATER = 75  # EX_TEMPFAIL

# Set by the local executor: the pid of the `serve` process the runner must not outlive...
PARENT_ENV = "BATCH_GATEWAY_RUNNER_PARENT"
# ...and the name the runner holds its lease under, so that the executor can release it the moment the runner dies.
OWNER_ENV = "BATCH_GATEWAY_RUNNER_OWNER"

"""The last step of infra/kind/README.md: one batch through batch-gateway with the official `openai` SDK.

    export OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=$(cat infra/kind/.api-key)
    python infra/kind/demo.py --requests 50

Uploads a JSONL file of chat requests, creates a batch, follows it to a terminal status and prints a result line.
On the kind cluster the batch runs as the Argo Workflow it names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from openai import OpenAI

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def batch_input(requests: int, model: str) -> bytes:
    lines = []
    for i in range(requests):
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
                {"role": "user", "content": f"Question {i}: what is {i} times {i}?"},
            ],
            "max_tokens": 32,
        }
        lines.append(json.dumps({"custom_id": f"demo-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20, help="request lines in the batch (default 20)")
    parser.add_argument("--model", default="sim-model", help="model name in every request (default sim-model)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the batch (default 600)")
    args = parser.parse_args(argv)

    client = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY") or sys.exit("set OPENAI_API_KEY (infra/kind/.api-key)"),
    )
    uploaded = client.files.create(file=("demo.jsonl", batch_input(args.requests, args.model)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"source": "infra/kind/demo.py"},
    )
    print(f"batch {batch.id} created; on Kubernetes it runs as Workflow bg-{batch.id.removeprefix('batch_')}")

    deadline = time.monotonic() + args.timeout
    shown = None
    while batch.status not in TERMINAL:
        if time.monotonic() > deadline:
            print(f"batch {batch.id} is still {batch.status} after {args.timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        progress = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
        if progress != shown:
            print(f"  {progress[0]:<12} completed {progress[1]:>5}  failed {progress[2]:>5}  of {args.requests}")
            shown = progress

    if batch.status != "completed" or not batch.output_file_id:
        errors = [e.message for e in (batch.errors.data if batch.errors and batch.errors.data else [])]
        print(f"batch {batch.id} ended {batch.status}: {errors or 'no output file'}", file=sys.stderr)
        return 1
    results = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines() if line]
    first = results[0]
    answer = first["response"]["body"]["choices"][0]["message"]["content"]
    print(f"batch {batch.id} completed: {len(results)} results; {first['custom_id']} → {answer!r}")
    if batch.error_file_id:
        failed = client.files.content(batch.error_file_id).text.count("\n")
        print(f"{failed} request(s) failed; see file {batch.error_file_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A finished batch sends its OpenAI-style webhook event, which the openai SDK verifies."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

from batch_gateway.webhooks import generate_secret
from tests.helpers import chat_lines, wait_for


def test_completed_batch_sends_a_verifiable_event(gateway_factory, sim_factory):
    received: list[tuple[bytes, dict]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = generate_secret()
    try:
        sim = sim_factory()
        gateway = gateway_factory(
            sim.url,
            env={"BATCH_GATEWAY_WEBHOOK": f"http://127.0.0.1:{server.server_port}/hook", "BATCH_GATEWAY_WEBHOOK_SECRET": secret},
        )
        client = gateway.client()
        file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_for(client, batch.id).status == "completed"
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(received) == 1
        body, headers = received[0]
        event = openai.OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=secret)
        assert event.type == "batch.completed" and event.data.id == batch.id
    finally:
        server.shutdown()

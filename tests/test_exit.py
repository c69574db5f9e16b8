"""How the gateway's processes exit: with the code they return, even while obstore's threads still call into Python."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.process

# Ends while obstore's threads are still handing a thousand results back (each takes the GIL to wake the event loop),
# as a runner's last checkpoint writes can: finalizing the interpreter under them crashes about half the time here
# (SIGABRT or SIGSEGV, on Python before 3.14).
EXIT_UNDER_OBSTORE = textwrap.dedent(
    """
    import asyncio, sys
    import obstore
    from obstore.store import LocalStore
    from batch_gateway.cli import exit_without_finalizing

    async def main():
        store = LocalStore(sys.argv[1], mkdir=True)
        puts = [asyncio.ensure_future(obstore.put_async(store, f"k{i}", b"x")) for i in range(1000)]
        await asyncio.wait(puts, return_when=asyncio.FIRST_COMPLETED)
        print("finished", flush=True)
        return 3

    exit_without_finalizing(asyncio.run(main()))
    """
)


def test_a_process_exits_with_its_code_while_obstore_threads_still_call_into_python(tmp_path):
    script = tmp_path / "exit_under_obstore.py"
    script.write_text(EXIT_UNDER_OBSTORE)
    for attempt in range(8):  # each attempt alone would pass a crashing exit half the time
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"store{attempt}")], capture_output=True, timeout=60
        )
        assert (done.returncode, done.stdout) == (3, b"finished\n"), done.stderr.decode()[-2000:]


def test_the_batch_gateway_script_exits_that_way():  # as the runner's pods start it
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "batch-gateway"]
    assert script.value == "batch_gateway.cli:entry"

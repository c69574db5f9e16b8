"""Tables, summaries and the small parsing helpers of the client, with fixed inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from openai.types import Batch

from batch_gateway.client import commands, watch
from batch_gateway.client.output import CommandError, format_bytes, render_table
from batch_gateway.client.partial import PartialResults
from batch_gateway.client.watch import WaitOptions


def test_table_aligns_columns_and_right_aligns_numbers():
    table = render_table(
        ("ID", "STATUS", "DONE", "NOTE"), [("batch_1", "completed", 40, None), ("batch_22", "failed", 7, "x")]
    )
    assert table.splitlines() == [
        "ID        STATUS     DONE  NOTE",
        "batch_1   completed    40  -",
        "batch_22  failed        7  x",
    ]


def test_empty_table_is_its_header():
    assert render_table(("ID", "STATUS"), []) == "ID  STATUS"


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (999, "999 B"), (3400, "3.4 KB"), (12_000_000, "12.0 MB"), (5 * 10**12, "5000.0 GB")]
)
def test_format_bytes(size, text):
    assert format_bytes(size) == text


def test_metadata_parsing():
    assert commands.parse_metadata(None) is None
    assert commands.parse_metadata(["run=nightly", "note=a=b"]) == {"run": "nightly", "note": "a=b"}
    with pytest.raises(CommandError, match="expected KEY=VALUE"):
        commands.parse_metadata(["oops"])


def test_default_result_paths_sit_next_to_the_input():
    assert commands.default_result_paths(Path("data/prompts.jsonl")) == (
        Path("data/prompts.output.jsonl"),
        Path("data/prompts.errors.jsonl"),
    )
    assert commands.default_result_paths(Path("in.txt")) == (Path("in.output.jsonl"), Path("in.errors.jsonl"))


def test_endpoint_is_guessed_from_the_first_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}\n')
    assert commands.guess_endpoint(path) == "/v1/embeddings"
    path.write_text("{not json\n")
    assert commands.guess_endpoint(path) is None


def test_resume_command_repeats_the_paths_and_base_url_but_never_the_key():
    options = WaitOptions(Path("my dir/out.jsonl"), Path("err.jsonl"), Path("part.jsonl"), 2.0, False)
    assert watch.resume_command("batch_1", options, "http://gw:8000/v1") == (
        "batch-gateway batches watch batch_1 --output 'my dir/out.jsonl' --errors err.jsonl "
        "--partial part.jsonl --base-url http://gw:8000/v1"
    )


def batch(**fields) -> Batch:
    base = dict(
        id="batch_1",
        object="batch",
        endpoint="/v1/chat/completions",
        input_file_id="file-in",
        completion_window="24h",
        status="completed",
        created_at=1_700_000_000,
        completed_at=1_700_000_062,
        request_counts={"total": 40, "completed": 38, "failed": 2},
        output_file_id="file-out",
        error_file_id="",
    )
    return Batch.model_validate({**base, **fields})


def test_summary_of_a_completed_batch():
    options = WaitOptions(Path("in.output.jsonl"), Path("in.errors.jsonl"), None, 2.0, False)
    text = watch.summary(batch(), options, 38, 2, None)
    assert text.splitlines() == [
        "Batch batch_1 completed in 1m02s: 40 requests, 38 completed, 2 failed.",
        "  output: in.output.jsonl (38 lines)",
        "  errors: in.errors.jsonl (2 lines)",
    ]


def test_summary_of_a_failed_batch_lists_the_validation_errors():
    failed = batch(
        status="failed",
        completed_at=None,
        failed_at=1_700_000_001,
        output_file_id=None,
        request_counts={"total": 0, "completed": 0, "failed": 0},
        errors={
            "object": "list",
            "data": [
                {"code": "invalid_json", "message": "Line 2 is not valid JSON.", "line": 2, "param": None},
                {"code": "model_not_found", "message": "No model 'x'.", "line": 5, "param": "body.model"},
            ],
        },
    )
    options = WaitOptions(Path("o"), Path("e"), None, 2.0, False)
    assert watch.summary(failed, options, None, None, None).splitlines() == [
        "Batch batch_1 failed in 1s.",
        "The input file did not validate:",
        "  line 2: invalid_json: Line 2 is not valid JSON.",
        "  line 5: model_not_found: No model 'x'. (param body.model)",
    ]
    assert watch.STATUS_EXIT_CODES["failed"] == 3


def test_describe_batch_treats_empty_file_ids_as_absent():
    text = commands.describe_batch(batch(metadata={"run": "a"}))
    assert "error_file_id   -" in text and "output_file_id  file-out" in text
    assert "metadata        run=a" in text


def test_partial_results_keep_each_line_once_across_polls_and_runs(tmp_path):
    path = tmp_path / "partial.jsonl"
    partial = PartialResults(path)
    assert partial.new_lines(b'{"id":"a"}\n{"id":"b"}\n\n') == [b'{"id":"a"}', b'{"id":"b"}']
    assert partial.new_lines(b'{"id":"a"}\n{"id":"b"}\n{"id":"c"}\n') == [b'{"id":"c"}']
    path.write_bytes(b'{"id":"a"}\n')
    resumed = PartialResults(path)  # a resumed watch does not write lines the file already has
    assert resumed.new_lines(b'{"id":"a"}\n{"id":"d"}') == [b'{"id":"d"}']


def test_watch_rejects_a_non_positive_interval():
    args = SimpleNamespace(interval=0, output=None, errors=None, partial=None, json=False)
    with pytest.raises(CommandError, match="--interval"):
        WaitOptions.from_args(args, default_output=Path("o"), default_errors=Path("e"))

"""The hand-made AWS Signature Version 4 of the stale-upload cleanup (moto's server accepts any signature, so the
signature is checked here: against AWS's published examples, and against botocore, AWS's own signer)."""

from __future__ import annotations

import datetime

import botocore.auth
import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from batch_gateway.store.s3_uploads import Credentials, bucket_from_env, sign_v4

EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
MAY_24_2013 = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("query", "signature"),
    # "Signature Calculations for the Authorization Header", Amazon S3 API Reference: GET Bucket Lifecycle, List Objects
    [
        ("lifecycle=", "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
        ("max-keys=2&prefix=J", "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ],
)
def test_signature_matches_the_aws_examples(query: str, signature: str):
    headers = sign_v4(
        "GET", httpx.URL("https://examplebucket.s3.amazonaws.com/"), query, EXAMPLE, "us-east-1", MAY_24_2013
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
    )


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", "/bucket/", "prefix=gw%2F&uploads="),
        ("GET", "/bucket/", "key-marker=gw%2Ft1%2Ffiles%2Fa%20b&prefix=gw%2F&upload-id-marker=abc~-_.&uploads="),
        ("DELETE", "/bucket/gw/t1/batches/batch_1/out%20file%2Bx", "uploadId=VXBsb2FkIElE%2B%2F%3D"),
    ],
)
def test_signature_matches_botocore_with_a_session_token(method: str, path: str, query: str, monkeypatch):
    credentials = Credentials("AKIDEXAMPLE", "secret/key+example", "session-token/with+chars=")
    now = datetime.datetime(2024, 2, 29, 12, 34, 56, tzinfo=datetime.UTC)
    url = f"http://127.0.0.1:9000{path}"
    ours = sign_v4(method, httpx.URL(url), query, credentials, "eu-west-1", now)

    request = AWSRequest(
        method=method, url=f"{url}?{query}", headers={"x-amz-content-sha256": ours["x-amz-content-sha256"]}
    )
    signer = S3SigV4Auth(
        BotoCredentials("AKIDEXAMPLE", "secret/key+example", "session-token/with+chars="), "s3", "eu-west-1"
    )
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))  # pin its clock
    signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-security-token"] == request.headers["X-Amz-Security-Token"]


def test_the_bucket_is_found_the_way_obstore_finds_it(monkeypatch):
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert (bucket_from_env("b").url, bucket_from_env("b").region) == (
        "https://s3.eu-west-1.amazonaws.com/b",
        "eu-west-1",
    )
    monkeypatch.setenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true")
    assert bucket_from_env("b").url == "https://b.s3.eu-west-1.amazonaws.com"
    monkeypatch.delenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000/")
    assert bucket_from_env("b").url == "http://minio:9000/b"

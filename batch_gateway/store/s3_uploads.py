"""Unfinished S3 multipart uploads: list them under a prefix, abort them.

A process killed during a multipart upload (a large file upload through the API, a runner writing its output file)
leaves the parts it sent in the bucket, invisible to listings and billed until someone aborts the upload. obstore
cannot do that: its object_store core can abort an upload only by the id the killed process held, and cannot list
uploads. boto3 could, but it is a large dependency for two calls; so this module signs the two requests itself (AWS
Signature Version 4, about thirty lines, sent with httpx), with the `AWS_*` environment variables obstore reads.

It needs static credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, with AWS_SESSION_TOKEN if temporary). With
an IAM role and no keys, `credentials_from_env()` returns None and gc skips this cleanup; a bucket lifecycle rule
(AbortIncompleteMultipartUpload) does the same job there.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import urllib.parse
import xml.etree.ElementTree as ElementTree

import httpx
import msgspec

from batch_gateway.errors import StorageUnavailable

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMEOUT = 30.0


class Credentials(msgspec.Struct, frozen=True):
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


class Bucket(msgspec.Struct, frozen=True):
    url: str  # requests go to url + "/" + key (path style, or virtual-hosted as obstore is configured)
    region: str


class PendingUpload(msgspec.Struct, frozen=True):
    key: str
    upload_id: str
    initiated: float  # Unix seconds, by the S3 server's clock


def credentials_from_env() -> Credentials | None:
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        return None
    return Credentials(key_id, secret, os.environ.get("AWS_SESSION_TOKEN") or None)


def bucket_from_env(name: str) -> Bucket:
    """Where the bucket answers, the way obstore finds it: AWS_ENDPOINT_URL (or AWS_ENDPOINT) for MinIO and the like,
    else AWS in AWS_REGION; path-style requests unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "").rstrip("/")
    virtual_hosted = os.environ.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "").lower() == "true"
    if virtual_hosted:  # obstore takes a custom endpoint to include the bucket already
        return Bucket(endpoint or f"https://{name}.s3.{region}.amazonaws.com", region)
    return Bucket(f"{endpoint or f'https://s3.{region}.amazonaws.com'}/{name}", region)


async def list_uploads(
    http: httpx.AsyncClient, bucket: Bucket, credentials: Credentials, prefix: str
) -> list[PendingUpload]:
    """Every multipart upload started under `prefix` and neither completed nor aborted (ListMultipartUploads)."""
    found: list[PendingUpload] = []
    markers: dict[str, str] = {}
    while True:
        answer = await _send(http, "GET", bucket, "", {"uploads": "", "prefix": prefix, **markers}, credentials)
        root = ElementTree.fromstring(answer.content)
        for upload in root.iterfind("{*}Upload"):
            initiated = datetime.datetime.fromisoformat(upload.findtext("{*}Initiated", "").replace("Z", "+00:00"))
            found.append(
                PendingUpload(upload.findtext("{*}Key", ""), upload.findtext("{*}UploadId", ""), initiated.timestamp())
            )
        if root.findtext("{*}IsTruncated", "false").lower() != "true":
            return found
        markers = {
            "key-marker": root.findtext("{*}NextKeyMarker", ""),
            "upload-id-marker": root.findtext("{*}NextUploadIdMarker", ""),
        }


async def abort_upload(
    http: httpx.AsyncClient, bucket: Bucket, credentials: Credentials, upload: PendingUpload
) -> None:
    """AbortMultipartUpload; an upload that is already gone is not an error."""
    await _send(http, "DELETE", bucket, upload.key, {"uploadId": upload.upload_id}, credentials, missing_ok=True)


async def _send(
    http: httpx.AsyncClient,
    method: str,
    bucket: Bucket,
    key: str,
    query: dict[str, str],
    credentials: Credentials,
    *,
    missing_ok: bool = False,
) -> httpx.Response:
    url = f"{bucket.url}/{_quote(key, safe='/')}" if key else f"{bucket.url}/"
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    headers = sign_v4(method, httpx.URL(url), canonical_query, credentials, bucket.region)
    try:
        response = await http.request(method, f"{url}?{canonical_query}", headers=headers, timeout=TIMEOUT)
    except httpx.HTTPError as exc:
        raise StorageUnavailable(f"S3 {method} {key or '/'}: {type(exc).__name__}: {exc}") from exc
    if response.is_success or (missing_ok and response.status_code == 404):
        return response
    raise StorageUnavailable(f"S3 {method} {key or '/'}: HTTP {response.status_code}: {response.text[:300]}")


def sign_v4(
    method: str,
    url: httpx.URL,
    canonical_query: str,
    credentials: Credentials,
    region: str,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """The headers that authenticate a bodiless S3 request (AWS Signature Version 4, signed in the headers). `url`
    is the request's URL without its query; `canonical_query` is the query exactly as it is sent: sorted, encoded."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": url.netloc.decode(), "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": stamp}
    if credentials.session_token:
        headers["x-amz-security-token"] = credentials.session_token
    names = sorted(headers)
    canonical_request = "\n".join(
        [
            method,
            url.raw_path.decode() or "/",
            canonical_query,
            "".join(f"{name}:{headers[name]}\n" for name in names),
            ";".join(names),
            EMPTY_SHA256,
        ]
    )
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (stamp[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return headers


def _quote(value: str, safe: str = "") -> str:
    """URI-encode as SigV4 wants: everything but unreserved characters (and `safe`)."""
    return urllib.parse.quote(value, safe="-_.~" + safe)

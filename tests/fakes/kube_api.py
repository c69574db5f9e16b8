"""A loopback fake of the Kubernetes API server: enough of it for the Argo executor and Service discovery.

It serves namespaced custom objects (`argoproj.io/v1alpha1` workflows, workflowtemplates, cronworkflows) and
EndpointSlices (`discovery.k8s.io/v1`) over real HTTP, the way the API server does: create (409 AlreadyExists on a
duplicate name, 422 Invalid on a body the strict Argo schema rejects, 404 when the namespace does not exist), get,
list with label selectors, JSON merge patch (RFC 7386; other patch types get 415) and delete (with a uid
precondition). Clients are real `kubernetes.client.ApiClient`s pointed at it; nothing of the client is mocked.

Tests can inject failures (`fail_next`), look at the requests made (`requests`) and play the controller (`set_status`).

For fast unit tests only: of the Argo executor's error handling (transient failures, 404s, replaced Workflows) and of
`k8s://` discovery. Everything end to end runs against a real API server and real Argo (tests/control_plane/).
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from kubernetes import client

from tests.fakes import argo_schemas

_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)

RESOURCES: dict[tuple[str, str, str], tuple[str, str | None]] = {
    # (group, version, plural): (kind, the Argo schema that validates it)
    ("argoproj.io", "v1alpha1", "workflows"): ("Workflow", "Workflow"),
    ("argoproj.io", "v1alpha1", "workflowtemplates"): ("WorkflowTemplate", "WorkflowTemplate"),
    ("argoproj.io", "v1alpha1", "cronworkflows"): ("CronWorkflow", "CronWorkflow"),
    ("discovery.k8s.io", "v1", "endpointslices"): ("EndpointSlice", None),
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class HTTPError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class FakeKubeAPI:
    """The ASGI app and its store. `namespaces=None` accepts any namespace."""

    def __init__(self, namespaces: set[str] | None = None) -> None:
        for kind in argo_schemas.ARGO_KINDS:
            argo_schemas.validator(kind)  # load now: missing CRDs fail the test's setup, not a request (as a 500)
        self.namespaces = namespaces
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (group, plural, namespace, name)
        self.requests: list[tuple[str, str]] = []
        self.rejected: list[list[str]] = []  # the validation errors of every refused create or patch
        self._faults: list[int] = []
        self._version = 0
        self._lock = threading.Lock()

    # --- test controls -------------------------------------------------------------------------

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses (e.g. 503, 503), whatever they ask."""
        with self._lock:
            self._faults.extend(statuses)

    def workflows(self, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o) for (g, p, ns, _), o in self.objects.items() if p == "workflows" and ns == namespace
            ]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            group = next(g for (g, _, p), _ in RESOURCES.items() if p == plural)
            found = self.objects.get((group, plural, namespace, name))
            return copy.deepcopy(found) if found else None

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object directly (as `kubectl apply` would), e.g. an EndpointSlice; validated like a create."""
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = next(
            p for (g, v, p), (kind, _) in RESOURCES.items() if g == group and v == version and kind == obj["kind"]
        )
        with self._lock:
            return self._create(group, version, plural, obj["metadata"]["namespace"], obj, replace=True)

    def set_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Play the Argo controller: merge `status` into a Workflow's status."""
        with self._lock:
            obj = self.objects[("argoproj.io", "workflows", namespace, name)]
            obj["status"] = merge_patch(obj.get("status") or {}, status)
            self._bump(obj)

    # --- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        method, path = scope["method"], scope["path"]
        self.requests.append((method, path))
        try:
            with self._lock:
                if self._faults:
                    code = self._faults.pop(0)
                    raise HTTPError(
                        code, "InternalError" if code >= 500 else "TooManyRequests", f"injected failure {code}"
                    )
                status, answer = self._handle(method, path, query, headers, body)
        except HTTPError as exc:
            status, answer = exc.code, self._status_object(exc.code, exc.reason, exc.message)
        payload = json.dumps(answer).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": payload})

    def _handle(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple[int, Any]:
        match = _PATH.match(path)
        if not match:
            raise HTTPError(404, "NotFound", f"the server could not find the requested resource ({path})")
        group, version, namespace, plural, name = match.group("group", "version", "namespace", "plural", "name")
        if (group, version, plural) not in RESOURCES:
            raise HTTPError(
                404, "NotFound", f"the server could not find the requested resource ({group}/{version} {plural})"
            )
        if method == "POST" and name is None:
            return 201, self._create(group, version, plural, namespace, self._json(body))
        if method == "GET" and name is None:
            return 200, self._list(group, version, plural, namespace, query.get("labelSelector", ""))
        if name is None:
            raise HTTPError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        key = (group, plural, namespace, name)
        kind = RESOURCES[(group, version, plural)][0]
        if method == "GET":
            return 200, copy.deepcopy(self._existing(key, kind))
        if method == "PATCH":
            content_type = headers.get("content-type", "").split(";")[0].strip()
            if content_type != "application/merge-patch+json":
                raise HTTPError(415, "UnsupportedMediaType", f"the fake serves merge patches only, not {content_type}")
            current = self._existing(key, kind)
            patched = merge_patch(current, self._json(body))
            patched["metadata"] = {
                **current["metadata"],
                **{k: v for k, v in patched["metadata"].items() if k in ("labels", "annotations")},
            }
            self._validate(kind, RESOURCES[(group, version, plural)][1], patched)
            self._bump(patched)
            self.objects[key] = patched
            return 200, copy.deepcopy(patched)
        if method == "DELETE":
            current = self._existing(key, kind)
            options = self._json(body) if body else {}
            wanted_uid = ((options or {}).get("preconditions") or {}).get("uid")
            if wanted_uid and wanted_uid != current["metadata"]["uid"]:
                raise HTTPError(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {wanted_uid}, UID in object meta: "
                    f"{current['metadata']['uid']}",
                )
            del self.objects[key]
            details = {"name": name, "kind": plural, "uid": current["metadata"]["uid"]}
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        raise HTTPError(405, "MethodNotAllowed", f"{method} is not supported")

    # --- store ---------------------------------------------------------------------------------

    def _create(
        self, group: str, version: str, plural: str, namespace: str, obj: Any, *, replace: bool = False
    ) -> dict[str, Any]:
        kind, schema = RESOURCES[(group, version, plural)]
        if self.namespaces is not None and namespace not in self.namespaces:
            raise HTTPError(404, "NotFound", f'namespaces "{namespace}" not found')
        if not isinstance(obj, dict) or obj.get("kind") != kind or obj.get("apiVersion") != f"{group}/{version}":
            raise HTTPError(400, "BadRequest", f"expected a {group}/{version} {kind}")
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace", namespace) != namespace:
            raise HTTPError(
                400, "BadRequest", "the namespace of the object does not match the namespace of the request"
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        self._validate(kind, schema, obj)
        key = (group, plural, namespace, meta["name"])
        if key in self.objects and not replace:
            raise HTTPError(409, "AlreadyExists", f'{plural}.{group} "{meta["name"]}" already exists')
        stored = copy.deepcopy(obj)
        stored["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            generation=1,
        )
        self._bump(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def _list(self, group: str, version: str, plural: str, namespace: str, selector: str) -> dict[str, Any]:
        kind = RESOURCES[(group, version, plural)][0]
        items = [
            copy.deepcopy(o)
            for (g, p, ns, _), o in sorted(self.objects.items())
            if g == group and p == plural and ns == namespace and _matches(o["metadata"].get("labels") or {}, selector)
        ]
        return {
            "apiVersion": f"{group}/{version}",
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._version)},
            "items": items,
        }

    def _existing(self, key: tuple[str, str, str, str], kind: str) -> dict[str, Any]:
        found = self.objects.get(key)
        if found is None:
            raise HTTPError(404, "NotFound", f'{key[1]}.{key[0]} "{key[3]}" not found')
        return found

    def _validate(self, kind: str, schema: str | None, obj: dict[str, Any]) -> None:
        problems = argo_schemas.errors(obj) if schema else argo_schemas.metadata_errors(obj)
        if problems:
            self.rejected.append(problems)
            raise HTTPError(422, "Invalid", f"{kind} is invalid: " + "; ".join(problems[:5]))

    def _bump(self, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise HTTPError(400, "BadRequest", f"the body is not JSON: {exc}") from exc

    @staticmethod
    def _status_object(code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }


class KubeAPIServer:
    """FakeKubeAPI on 127.0.0.1 (a free port), served by uvicorn in a thread."""

    def __init__(self, namespaces: set[str] | None = None) -> None:
        self.api = FakeKubeAPI(namespaces)
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.api, log_config=None, access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None
        self._clients: list[client.ApiClient] = []

    def start(self) -> KubeAPIServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Kubernetes API did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for api_client in self._clients:
            api_client.close()
        self._server.should_exit = True
        if self._thread:
            self._thread.join(10)
        self._socket.close()

    def api_client(self) -> client.ApiClient:
        """A real kubernetes ApiClient pointed at this server (closed by stop())."""
        configuration = client.Configuration()
        configuration.host = self.url
        configuration.retries = 0  # the code under test does its own retrying; don't let urllib3 hide failures
        api_client = client.ApiClient(configuration)
        self._clients.append(api_client)
        return api_client

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for this server, for child processes (KUBECONFIG=path)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

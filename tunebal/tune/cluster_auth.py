"""Ray token authentication as a client sees it: which token we would send, and whether the
cluster at an address accepts it, checked in well under a second before Ray starts.

Ray 2.60 clusters started with ``RAY_AUTH_MODE=token`` (or where ``~/.ray/auth_token`` exists
when a local cluster starts) reject every gRPC and dashboard request without the cluster's
token. A client that does not send it (``RAY_AUTH_MODE`` unset or ``disabled``) only fails
after Ray's connection retries, about two minutes later, with a traceback. So before Ray
starts, tunebal asks the address once, with a short timeout, over the protocol that address
speaks:

- ``HOST:PORT`` (the GCS): ``NodeInfoGcsService.GetClusterId``;
- ``ray://HOST:PORT`` (Ray Client server): ``RayletDriver.ClusterInfo(PING)``;
- ``http(s)://HOST:PORT`` (the dashboard, used for job submission): ``GET /api/version``,

with the header ``authorization: Bearer TOKEN`` when we have a token. The token is looked up
where Ray looks: ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``. When the cluster accepts our token and ``RAY_AUTH_MODE`` is unset, we set
``RAY_AUTH_MODE=token`` for this process (Ray reads it at ``ray.init``), so a user with the token
in place needs nothing else; an explicit ``RAY_AUTH_MODE=disabled`` against a token cluster is
one line saying so. How to create and distribute the token: docs/cluster.md.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tunebal.errors import ConfigError

AUTH_DOC = "see docs/cluster.md, 'Token authentication'"


@dataclass(frozen=True)
class ClientToken:
    """The token this client would send and where it came from (None: no token found)."""

    value: str | None
    source: str


def client_token() -> ClientToken:
    """The token, looked up in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return ClientToken(value, "RAY_AUTH_TOKEN")
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var).expanduser() if path_var else Path.home() / ".ray" / "auth_token"
    where = f"RAY_AUTH_TOKEN_PATH ({path})" if path_var else str(path)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if path_var:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path_var}: no such file") from None
        return ClientToken(None, "none")
    except OSError as exc:
        raise ConfigError(f"cannot read the Ray token {where} ({exc.strerror or exc})") from None
    return ClientToken(value or None, where)


def auth_mode() -> str:
    """``RAY_AUTH_MODE`` as this process has it ('' when unset)."""
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower()


class _Answer:
    OK, REJECTED, OTHER = "ok", "rejected", "other"


def _ask_grpc(kind: str, host: str, port: int, token: str | None, timeout: float) -> tuple[str, str]:
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            if kind == "client":
                from ray.core.generated import ray_client_pb2 as pb
                from ray.core.generated import ray_client_pb2_grpc as stubs

                stubs.RayletDriverStub(channel).ClusterInfo(
                    pb.ClusterInfoRequest(type=pb.ClusterInfoType.PING), timeout=timeout, metadata=metadata
                )
            else:
                from ray.core.generated import gcs_service_pb2 as pb
                from ray.core.generated import gcs_service_pb2_grpc as stubs

                stubs.NodeInfoGcsServiceStub(channel).GetClusterId(
                    pb.GetClusterIdRequest(), timeout=timeout, metadata=metadata
                )
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return _Answer.REJECTED, exc.details() or code.name
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _Answer.OTHER, f"no answer in {timeout:.0f} s"
            return _Answer.OTHER, f"{code.name}: {exc.details()}"
    return _Answer.OK, ""


def _ask_http(url: str, token: str | None, timeout: float) -> tuple[str, str]:
    request = urllib.request.Request(url.rstrip("/") + "/api/version")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (a user-given http URL)
            response.read(4096)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return _Answer.REJECTED, f"HTTP {exc.code}"
        return _Answer.OTHER, f"HTTP {exc.code} from {url} (is it a Ray dashboard?)"
    except (urllib.error.URLError, OSError) as exc:
        return _Answer.OTHER, str(getattr(exc, "reason", exc))
    return _Answer.OK, ""


def check_auth(address: str, host: str, port: int, timeout: float) -> None:
    """One request to ``address``; raise a one-line ConfigError when the cluster rejects us."""
    token = client_token()
    if address.startswith(("http://", "https://")):
        answer, detail = _ask_http(address, token.value, timeout)
    else:
        kind = "client" if address.startswith("ray://") else "gcs"
        answer, detail = _ask_grpc(kind, host, port, token.value, timeout)
    if answer == _Answer.OTHER:
        raise ConfigError(f"the Ray cluster at {address} did not answer as Ray does ({detail})")
    if answer == _Answer.REJECTED:
        if token.value is None:
            raise ConfigError(
                f"the Ray cluster at {address} uses token authentication and no token was found: put the "
                f"cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token ({AUTH_DOC})"
            )
        raise ConfigError(f"the Ray cluster at {address} rejected the token from {token.source} ({AUTH_DOC})")
    if token.value is not None:
        mode = auth_mode()
        if mode == "":
            os.environ["RAY_AUTH_MODE"] = "token"  # Ray reads it at ray.init; harmless on a cluster without auth
        elif mode != "token" and _needs_token(address, host, port, timeout):
            raise ConfigError(
                f"the Ray cluster at {address} uses token authentication but RAY_AUTH_MODE={mode} here: "
                f"set RAY_AUTH_MODE=token ({AUTH_DOC})"
            )


def _needs_token(address: str, host: str, port: int, timeout: float) -> bool:
    """Whether the cluster rejects a request without a token."""
    if address.startswith(("http://", "https://")):
        answer, _ = _ask_http(address, None, timeout)
    else:
        answer, _ = _ask_grpc("client" if address.startswith("ray://") else "gcs", host, port, None, timeout)
    return answer == _Answer.REJECTED


def auth_headers() -> dict[str, str]:
    """HTTP headers for the dashboard's job API (empty without a token)."""
    token = client_token()
    return {"Authorization": f"Bearer {token.value}"} if token.value else {}

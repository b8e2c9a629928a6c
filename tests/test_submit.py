"""A real token-auth Ray head on loopback: auth errors are one line within seconds, and a search
submitted as a Ray job with ``tunebal submit`` succeeds and leaves a readable summary.

The head is started as a user's ``launch/`` config would NOT protect against: with the system
PATH (no venv activated), so an entrypoint that said ``python`` would get the wrong interpreter.
It is stopped by killing only its own processes (never ``ray stop``, which kills every Ray here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunebal.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
TINY = ["--data", "n_train=128", "--data", "n_val=64", "--data", "n_test=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """(gcs address, dashboard url, client address) of a fresh head with RAY_AUTH_MODE=token."""
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    gcs, dash, client, agent, agent_grpc, metrics = (_free_port() for _ in range(6))
    system_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if ".venv" not in p)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PATH": system_path}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics),
         "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, check=True, timeout=120, capture_output=True,
    )
    try:
        deadline = time.monotonic() + 60  # `ray start` returns before the client server listens
        for port in (gcs, dash, client):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"port {port} of the test head never opened"
                    time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"ray://127.0.0.1:{client}"
    finally:
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _client_env(monkeypatch, mode: str | None, token: str | None, home: Path) -> None:
    monkeypatch.setenv("HOME", str(home))  # no ~/.ray/auth_token of the machine's user
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    for name, value in (("RAY_AUTH_MODE", mode), ("RAY_AUTH_TOKEN", token)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["gcs", "dashboard", "ray-client"])
@pytest.mark.parametrize(
    "mode, token, expected",
    [
        (None, None, "uses token authentication and no token was found"),
        ("token", "not-the-token", "rejected the token from RAY_AUTH_TOKEN"),
        ("disabled", TOKEN, "uses token authentication but RAY_AUTH_MODE=disabled here"),
        (None, TOKEN, None),
    ],
    ids=["no-token", "wrong-token", "mode-disabled", "ok"],
)
def test_auth_is_checked_in_one_request(token_head, monkeypatch, tmp_path, which, mode, token, expected):
    from tunebal.tune.preflight import probe_address

    _client_env(monkeypatch, mode, token, tmp_path)
    address = token_head[which]
    start = time.monotonic()
    if expected is None:
        probe_address(address)
        assert os.environ["RAY_AUTH_MODE"] == "token"  # what ray.init needs to send the token
    else:
        with pytest.raises(ConfigError, match=expected):
            probe_address(address)
    assert time.monotonic() - start < 5


def test_token_file_is_found_where_ray_looks(token_head, monkeypatch, tmp_path):
    from tunebal.tune.cluster_auth import client_token
    from tunebal.tune.preflight import probe_address

    _client_env(monkeypatch, None, None, tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN + "\n")
    assert client_token().value == TOKEN
    probe_address(token_head[0])
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        client_token()


def _cli(*args, env, cwd, timeout=60):
    return subprocess.run([sys.executable, "-m", "tunebal", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_search_address_without_token_is_one_line_within_seconds(token_head, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    start = time.monotonic()
    proc = _cli("search", "baseline", "--address", token_head[0], "--storage", str(tmp_path / "r"), *TINY,
                env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no token was found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30  # Ray itself would retry for about two minutes


def test_submit_refuses_bad_input_before_sending(token_head, tmp_path):
    env = {**os.environ, "RAY_AUTH_TOKEN": TOKEN, "HOME": str(tmp_path)}
    for args, message in (
        (["nosuch"], "unknown method 'nosuch'"),
        (["baseline", "--max-epochs", "0"], "--max-epochs must be >= 1"),
        (["baseline", "--address", "x:1"], "drop --address"),
        ([], "give the search to run"),
    ):
        proc = _cli("submit", "--dashboard", token_head[1], *args, env=env, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = _cli("submit", "--dashboard", token_head[1], "--python", "python", "baseline", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "must be an absolute path" in proc.stderr
    proc = _cli("submit", "--dashboard", token_head[0], "baseline", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "must be the head's dashboard URL" in proc.stderr


def test_a_submitted_search_succeeds_and_its_summary_is_readable(token_head, tmp_path):
    """The head runs entrypoints with the system Python first on PATH; ``--python`` (absolute)
    makes the job use the interpreter that has tunebal, from a directory outside the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN=TOKEN)
    storage = tmp_path / "results"
    proc = _cli("submit", "--dashboard", token_head[1], "--python", sys.executable, "--wait-timeout", "240",
                "baseline", "--num-samples", "2", "--max-epochs", "1", "--storage", str(storage), "--name", "job1",
                *TINY, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout
    summary = json.loads((storage / "job1" / "summary.json").read_text())
    assert summary["best"] is not None and len(summary["trials"]) == 2
    assert 0.0 <= summary["best"]["test"]["test/acc"] <= 1.0

"""``tunebal submit``: run a search on a Ray cluster as a Ray job.

The job's entrypoint is ``PYTHON -m tunebal search ...`` with an absolute interpreter path, so
it never depends on what ``python`` means on the head's PATH (a head started with a venv's
``ray`` but without the venv activated runs entrypoints with the system Python). Two ways to
get tunebal there:

- the cluster's installed tunebal (default): ``--python`` is the interpreter of the venv that
  every config in ``launch/`` installs tunebal into (``/opt/tunebal/venv/bin/python``);
- ``--install``: this machine's tunebal package is uploaded as a Ray ``py_modules`` entry and
  its requirements are installed by Ray's ``pip`` runtime environment on the cluster (which
  sees the cluster's own packages, so installed ones are not fetched again); the entrypoint
  then runs the runtime environment's interpreter.

Nothing else is uploaded: no working directory (no .git, no venv; Ray caps it at 100 MiB).
Options are checked here before anything is sent (search options, method, dataset, space),
and the dashboard address and token in well under a second (tunebal/tune/cluster_auth.py).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tunebal.errors import ConfigError

DEFAULT_CLUSTER_PYTHON = "/opt/tunebal/venv/bin/python"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitOptions:
    dashboard: str
    search_args: list[str]
    python: str = DEFAULT_CLUSTER_PYTHON
    install: bool = False
    wait: bool = True
    wait_timeout_s: float = 24 * 3600.0
    submission_id: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def check_dashboard(url: str) -> None:
    """The dashboard URL must be http(s)://HOST:PORT and answer as Ray with our token."""
    from tunebal.tune import preflight

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--dashboard {url!r} must be the head's dashboard URL, e.g. http://HEAD:8265")
    preflight.probe_address(url)


def check_search_args(args: Sequence[str]) -> list[str]:
    """Parse and validate the search options locally (as ``tunebal search`` would, without the
    storage, which lives on the cluster). Returns the argument list to run on the cluster."""
    from tunebal.cli import build_parser, search_options
    from tunebal.data import get_dataset_spec
    from tunebal.methods import get_method_class
    from tunebal.tune.spaces import apply_overrides, load_space

    if not args:
        raise ConfigError("tunebal submit: give the search to run, e.g. tunebal submit --dashboard URL aim --dataset ks")
    namespace = build_parser().parse_args(["search", *args])
    if namespace.address:
        raise ConfigError("tunebal submit: drop --address; the job runs on the cluster it is submitted to")
    opts = search_options(namespace)
    opts.validate()
    get_method_class(opts.method)
    spec = get_dataset_spec(opts.dataset)
    if opts.space_file is None:  # a --space file is read on the cluster
        space = load_space(opts.method, opts.dataset, opts.max_epochs)
        apply_overrides(space, opts.overrides, opts.method, opts.dataset)
    values = {k: v for k, v in opts.data_values.items() if k != "root"}  # root is a path on the cluster
    spec.knobs.resolve(values, where="--data ")
    return list(args)


def requirements() -> list[str]:
    """tunebal's own requirements (its installed metadata), for ``--install``."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("tunebal") or []
    except PackageNotFoundError:
        raise ConfigError("--install needs tunebal installed here (pip install -e . or the wheel)") from None
    return [r for r in reqs if "extra ==" not in r]


def runtime_env(opts: SubmitOptions) -> dict[str, Any]:
    """The job's runtime environment: env vars only, or the package + its requirements."""
    env: dict[str, Any] = {"env_vars": dict(opts.extra_env)}
    if opts.install:
        import tunebal

        env["py_modules"] = [str(Path(tunebal.__file__).resolve().parent)]
        env["pip"] = requirements()
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env


def entrypoint(opts: SubmitOptions) -> str:
    python = "python" if opts.install else opts.python  # --install: the runtime env's interpreter
    if not opts.install and not Path(opts.python).is_absolute():
        raise ConfigError(f"--python {opts.python!r} must be an absolute path on the cluster (the head's PATH is not used)")
    return f"{shlex.quote(python)} -m tunebal search {shlex.join(opts.search_args)}"


def submit(opts: SubmitOptions, out=print) -> int:
    """Submit, then (unless --no-wait) follow the job's logs until it ends. Returns an exit code."""
    from tunebal.tune.cluster_auth import auth_headers

    opts.search_args = check_search_args(opts.search_args)
    check_dashboard(opts.dashboard)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(opts.dashboard, headers=auth_headers())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot use the job API at {opts.dashboard} ({_first_line(exc)})") from None
    job = _submit_with_retry(client, dict(
        entrypoint=entrypoint(opts), runtime_env=runtime_env(opts), submission_id=opts.submission_id,
        metadata={"tool": "tunebal", "search": " ".join(opts.search_args)[:1000]},
    ))
    out(f"submitted job {job} to {opts.dashboard}")
    out(f"  follow: ray job logs --follow --address {opts.dashboard} {job}   stop: ray job stop --address {opts.dashboard} {job}")
    if not opts.wait:
        return 0
    status = wait_for(client, job, opts.wait_timeout_s)
    logs = client.get_job_logs(job)
    out(logs.rstrip())
    out(f"job {job}: {status}")
    if status == "FAILED" and "No module named" in logs:
        out("tunebal: hint: the job's interpreter lacks tunebal or its dependencies; pass the cluster venv's "
            "--python, or --install")
    return 0 if status == "SUCCEEDED" else 1


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _submit_with_retry(client, request: dict[str, Any], patience_s: float = 60.0) -> str:
    """``submit_job``, retried while a just-started head has no job agent yet (HTTP 500 "No
    available agent ... try again later"); any other refusal is one line."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as exc:
            message = _first_line(exc)
            if "try again later" in message and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise ConfigError(f"the cluster refused the job: {message}") from None


def wait_for(client, job: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job ends or ``timeout_s`` passes (then the job keeps running on the cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise ConfigError(f"job {job} still {status} after {timeout_s:.0f} s; it keeps running on the cluster")
        time.sleep(poll_s)

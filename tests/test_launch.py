"""The launch/ configs as they ship: ray up files validated by Ray's own cluster-config code and
schema, KubeRay manifests and the Dockerfile checked for what a tunebal cluster needs (token
auth everywhere, GPU requests, the shared results volume, the interpreter `tunebal submit`
uses), and the SLURM script run with stand-ins for srun/scontrol to check the command it
builds (a real `ray symmetric-run` ends with `ray stop`, which would kill every Ray here)."""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tunebal.tune.submit import DEFAULT_CLUSTER_PYTHON, check_search_args

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
VENV = str(Path(DEFAULT_CLUSTER_PYTHON).parents[1])  # /opt/tunebal/venv


@pytest.mark.parametrize("name", ["existing-machines.yaml", "aws-gpu.yaml"])
def test_ray_up_configs_pass_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((LAUNCH / "ray-up" / name).read_text())
    assert "min_workers" not in raw  # the legacy top-level field
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # jsonschema against ray/autoscaler/ray-schema.json, plus Ray's checks
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token reaches every node
    assert "/opt/tunebal/src" in raw["file_mounts"] and ".git" in raw["rsync_exclude"] and ".venv" in raw["rsync_exclude"]
    assert any(f"{VENV}/bin/pip install" in c and "/opt/tunebal/src" in c for c in raw["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in raw[key]:
            if "ray " in command:  # every ray command runs from the venv, with token auth
                assert command.startswith(f"export PATH={VENV}/bin:$PATH RAY_AUTH_MODE=token;"), command
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_aws_config_has_gpu_workers_and_no_trials_on_the_head():
    raw = yaml.safe_load((LAUNCH / "ray-up" / "aws-gpu.yaml").read_text())
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and gpu[0]["node_config"]["InstanceType"].startswith("g")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_token_auth_gpus_and_the_shared_volume(name):
    docs = _docs(LAUNCH / "kuberay" / name)
    (ray_doc,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert ray_doc["kind"] in ("RayCluster", "RayJob")
    cluster = ray_doc["spec"]["rayClusterSpec"] if ray_doc["kind"] == "RayJob" else ray_doc["spec"]
    assert cluster["rayVersion"] == "2.60.0"
    for role, pod in _pod_specs(ray_doc):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", role
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tunebal-ray-token", "key": "auth_token"}
            assert container["image"] == "TUNEBAL_IMAGE"
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            if role == "gpu":
                assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
            else:
                assert "nvidia.com/gpu" not in limits
            if role != "submitter":
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
                assert claims[mounts["/results"]] == "tunebal-results"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    if ray_doc["kind"] == "RayCluster":
        (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert pvc["metadata"]["name"] == "tunebal-results" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_entrypoint_is_an_absolute_interpreter_running_a_valid_search():
    (job,) = [d for d in _docs(LAUNCH / "kuberay" / "rayjob.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == [DEFAULT_CLUSTER_PYTHON, "-m", "tunebal", "search"]
    check_search_args(argv[4:])  # the options a user would otherwise only see fail on the cluster
    assert argv[argv.index("--storage") + 1] == "/results"


def test_dockerfile_installs_into_the_venv_submit_uses():
    text = (LAUNCH / "Dockerfile").read_text()
    assert f"python -m venv {VENV}" in text and f"ENV PATH={VENV}/bin:$PATH" in text
    assert "COPY search_spaces ./search_spaces" in text  # tunebal/search_spaces links to it
    assert "pip install --no-cache-dir /opt/tunebal/src" in text and " -e " not in text
    ignored = (LAUNCH / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "build"} <= set(ignored)


def _shim(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_sbatch(tmp_path: Path, args: list[str], results: str | None):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "srun.log"
    _shim(bindir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    _shim(bindir, "srun", f'if [[ " $* " == *" hostname --ip-address "* ]]; then echo 10.1.2.3; exit 0; fi\n'
                          f'printf "%s\\n" "$@" > {log}\n')
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "4", "HOME": str(tmp_path)}
    if results:
        env["TUNEBAL_RESULTS"] = results
    proc = subprocess.run(["bash", str(LAUNCH / "slurm" / "tunebal.sbatch"), *args], env=env, capture_output=True,
                          text=True, timeout=30)
    return proc, (log.read_text().splitlines() if log.exists() else None)


def test_slurm_script_starts_symmetric_run_on_every_node_and_runs_the_search(tmp_path):
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm" / "tunebal.sbatch")], check=True)
    search = ["aim", "--dataset", "synth", "--num-samples", "16", "--gpus-per-trial", "0.5"]
    proc, argv = _run_sbatch(tmp_path, search, "/shared/results")
    assert proc.returncode == 0, proc.stderr
    sep = argv.index("--")
    ray_part, entry = argv[:sep], argv[sep + 1:]
    assert ray_part[:2] == ["--nodes=2", "--ntasks-per-node=1"]
    assert ray_part[2:4] == ["ray", "symmetric-run"]
    flags = dict(zip(ray_part[4::2], ray_part[5::2]))
    assert flags == {"--address": "10.1.2.3:6379", "--min-nodes": "2", "--num-cpus": "32", "--num-gpus": "4",
                     "--dashboard-host": "127.0.0.1"}
    assert entry[:4] == [DEFAULT_CLUSTER_PYTHON, "-m", "tunebal", "search"]
    assert entry[4:] == [*search, "--storage", "/shared/results"]
    check_search_args(entry[4:])


def test_slurm_script_refuses_to_run_without_a_results_directory(tmp_path):
    proc, argv = _run_sbatch(tmp_path, [], None)
    assert proc.returncode != 0 and "TUNEBAL_RESULTS" in proc.stderr and argv is None


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck():
    for script in (LAUNCH / "slurm" / "tunebal.sbatch", LAUNCH / "submit.sh"):
        subprocess.run(["shellcheck", str(script)], check=True)

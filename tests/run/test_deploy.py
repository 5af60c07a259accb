"""deploy/: every YAML parses, manifests match the specs the code builds, Dockerfiles and environment.yml
carry the pins of pyproject.toml (Docker itself cannot run here: the Dockerfiles are checked statically)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONDA_NAMES = {"torch": "pytorch"}  # conda-forge names that differ from PyPI's
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([A-Za-z0-9_.+\-]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pins(with_optional: bool = True) -> dict[str, str]:
    proj = _pyproject()["project"]
    lines = list(proj["dependencies"])
    if with_optional:
        for group in proj.get("optional-dependencies", {}).values():
            lines += group
    unpinned = [d for d in lines if "==" not in d]
    assert not unpinned, f"pyproject.toml has unpinned dependencies {unpinned}"
    return _pins(lines)


def cluster_pins() -> dict[str, str]:
    return _pins((DEPLOY / "requirements-cluster.txt").read_text().splitlines())


YAMLS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_all_deploy_yamls_found():
    names = {str(p.relative_to(DEPLOY)) for p in YAMLS}
    assert {
        "dask/mpm.yaml",
        "jobqueue/jobqueue.yaml",
        "gateway/values.yaml",
        "kubernetes/daskcluster-gpu.yaml",
        "kubernetes/daskjob-gpu.yaml",
        "profiles/slurm-gpu.yaml",
    } <= names


def test_dask_config_makes_workers_non_daemonic():
    import dask

    cfg = yaml.safe_load((DEPLOY / "dask" / "mpm.yaml").read_text())
    with dask.config.set(cfg):
        assert dask.config.get("distributed.worker.daemon") is False


# -- Kubernetes -------------------------------------------------------------------------------------


def _doc(path: Path, kind: str) -> dict:
    return next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind)


def _key_fields(cluster_spec: dict) -> dict:
    """What must agree between a manifest and the spec the code builds (the operator fills the rest)."""
    w = cluster_spec["worker"]
    wc = w["spec"]["containers"][0]
    sc = cluster_spec["scheduler"]["spec"]["containers"][0]
    return {
        "replicas": w["replicas"],
        "image": wc["image"],
        "worker_args": [str(a) for a in wc["args"]],
        "worker_resources": wc["resources"],
        "worker_env": wc.get("env"),
        "mounts": wc.get("volumeMounts"),
        "volumes": w["spec"].get("volumes"),
        "node_selector": w["spec"].get("nodeSelector"),
        "tolerations": w["spec"].get("tolerations"),
        "scheduler_image": sc["image"],
        "scheduler_args": [str(a) for a in sc["args"]],
        "scheduler_resources": sc["resources"],
        "service_type": cluster_spec["scheduler"]["service"]["type"],
    }


@pytest.fixture(scope="module")
def built_spec():
    pytest.importorskip("dask_kubernetes")
    from pipeline.run.cluster import kubernetes_cluster_spec, load_profile

    return kubernetes_cluster_spec(load_profile("kubernetes-gpu"), name="mpm")


def test_daskcluster_manifest_matches_the_spec_built_from_the_profile(built_spec):
    manifest = _doc(DEPLOY / "kubernetes" / "daskcluster-gpu.yaml", "DaskCluster")
    assert manifest["apiVersion"] == built_spec["apiVersion"]
    assert manifest["metadata"] == built_spec["metadata"]
    assert _key_fields(manifest["spec"]) == _key_fields(built_spec["spec"])


def test_gpu_worker_group_layout(built_spec):
    k = _key_fields(built_spec["spec"])
    args = k["worker_args"]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--nthreads") + 1] == "1" and args[args.index("--resources") + 1] == "GPU=1"
    assert k["worker_resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in str(k["scheduler_resources"])
    assert k["service_type"] == "ClusterIP"  # never a public scheduler/dashboard
    assert {"name": "DASK_DISTRIBUTED__WORKER__DAEMON", "value": "False"} in k["worker_env"]


def test_daskjob_cluster_matches_the_daskcluster_and_runs_mpm(built_spec):
    job = _doc(DEPLOY / "kubernetes" / "daskjob-gpu.yaml", "DaskJob")
    got, want = _key_fields(job["spec"]["cluster"]["spec"]), _key_fields(built_spec["spec"])
    for key in (
        "replicas",
        "image",
        "worker_args",
        "worker_resources",
        "worker_env",
        "mounts",
        "volumes",
        "node_selector",
        "tolerations",
        "scheduler_image",
        "scheduler_args",
        "service_type",
    ):
        assert got[key] == want[key], key
    container = job["spec"]["job"]["spec"]["containers"][0]
    cmd = " ".join(container["command"] + container["args"])
    assert "mpm run" in cmd and "--cluster" in cmd and "DASK_SCHEDULER_ADDRESS" in cmd
    assert container["image"] == want["image"]
    from pipeline.run.cli import build_parser  # the job's command line is one the CLI accepts

    argv = shlex.split(container["args"][0].replace('"$DASK_SCHEDULER_ADDRESS"', "tcp://s:8786"))
    assert build_parser().parse_args(argv[1:]).cluster == "tcp://s:8786"


# -- Dask Gateway ----------------------------------------------------------------------------------


def test_gateway_values_authenticate_and_offer_gpu_options():
    values = yaml.safe_load((DEPLOY / "gateway" / "values.yaml").read_text())
    assert values["gateway"]["auth"]["type"] in ("jupyterhub", "kerberos", "simple")
    assert values["gateway"]["auth"]["type"] != "simple" or values["gateway"]["auth"]["simple"].get("password")
    assert values["traefik"]["service"]["type"] == "ClusterIP"
    code = values["gateway"]["extraConfig"]["mpm-options"]
    compile(code, "extraConfig", "exec")  # the server runs it; it must at least be valid Python
    for option in ("worker_gpus", "worker_cores", "worker_memory", "image"):
        assert f'"{option}"' in code
    assert "nvidia.com/gpu" in code and "DASK_DISTRIBUTED__WORKER__RESOURCES" in code
    profile = yaml.safe_load((DEPLOY / "profiles" / "gateway-gpu.yaml").read_text())
    assert set(profile["gateway"]["cluster_options"]) <= {"worker_gpus", "worker_cores", "worker_memory", "image"}


# -- dask-jobqueue config file -----------------------------------------------------------------------


@pytest.mark.parametrize("system, directive", [("slurm", "#SBATCH --gres=gpu:1"), ("pbs", "ngpus=1")])
def test_jobqueue_config_file_gives_gpu_job_scripts(system, directive):
    jq = pytest.importorskip("dask_jobqueue")
    import dask

    cfg = yaml.safe_load((DEPLOY / "jobqueue" / "jobqueue.yaml").read_text())
    job_cls = {"slurm": jq.slurm.SLURMJob, "pbs": jq.pbs.PBSJob}[system]
    # dotted keys: set over dask-jobqueue's defaults, as a file in ~/.config/dask/ would be merged
    flat = {f"jobqueue.{s}.{k}": v for s, opts in cfg["jobqueue"].items() for k, v in opts.items()}
    with dask.config.set(flat):
        script = job_cls(scheduler="tcp://10.1.2.3:8786", name="w").job_script()
    assert directive in script and "--nthreads 1" in script and "--resources GPU=1" in script


# -- Dockerfiles -----------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE"}


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_is_well_formed_and_pinned(name):
    path = DEPLOY / name
    ins = dockerfile_instructions(path)
    assert all(i in KNOWN for i, _ in ins), [i for i, _ in ins if i not in KNOWN]
    base = base_image(ins)
    want_py = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert re.match(rf"python:{re.escape(want_py)}(-|$)", base), f"{name}: base {base!r} is not Python {want_py}"
    assert re.search(r"@sha256:[0-9a-f]{64}$", base), f"{name}: base {base!r} is not pinned by digest"
    # everything COPY'd exists in the repository
    for i, args in ins:
        if i == "COPY":
            *srcs, _dst = args.split()
            for s in srcs:
                assert (ROOT / s).exists(), f"{name}: COPY source {s!r} does not exist"
    runs = " ".join(a for i, a in ins if i == "RUN")
    # dependencies before the source: the layer that installs them does not change with pipeline/
    first_source = next(k for k, (i, a) in enumerate(ins) if i == "COPY" and a.startswith("pipeline/"))
    deps = next(k for k, (i, a) in enumerate(ins) if i == "RUN" and "-r deploy/requirements-cluster.txt" in a)
    assert deps < first_source, f"{name}: the dependencies are installed after the source is copied"
    assert "['project']['dependencies']" in ins[deps][1], f"{name}: pyproject's dependencies are not installed first"
    assert any(i == "RUN" and "pip install --no-deps ." in a for i, a in ins[first_source:]), name
    # any explicit pin matches pyproject.toml (or requirements-cluster.txt for the cluster packages)
    known = {**cluster_pins(), **pyproject_pins()}
    explicit = _pins(shlex.split(runs.replace("&&", " ").replace(";", " ")))
    assert explicit, f"{name}: expected the torch pin to be explicit"
    for pkg, ver in explicit.items():
        assert known.get(pkg) == ver, f"{name}: {pkg}=={ver} but pyproject/requirements pin {known.get(pkg)}"
    assert any(i == "USER" and a not in ("root", "0") for i, a in ins), f"{name}: runs as root"
    assert any(i == "COPY" and "deploy/dask/mpm.yaml" in a for i, a in ins)
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "MPM_PROFILE_DIR=/opt/mpm/deploy/profiles" in env
    assert (DEPLOY / f"{name}.dockerignore").is_file()


def base_image(ins: list[tuple[str, str]]) -> str:
    """The image of the first FROM, with ``${ARG}`` replaced by the default of an ARG before it."""
    args = {}
    for i, a in ins:
        if i == "ARG" and "=" in a:
            k, _, v = a.partition("=")
            args[k] = v
        if i == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
    raise AssertionError("no FROM")


def _torch_checks(name: str) -> list[str]:
    """The ``python -c`` programs of a Dockerfile that look at ``torch.version.cuda``."""
    runs = " ".join(a for i, a in dockerfile_instructions(DEPLOY / name) if i == "RUN")
    return [p for p in re.findall(r'python -c "([^"]+)"', runs) if "torch.version.cuda" in p and "sys.exit" in p]


@pytest.mark.parametrize("name, wants_cuda", [("Dockerfile.cpu", False), ("Dockerfile.cuda", True)])
def test_image_build_fails_on_the_wrong_torch_build(name, wants_cuda):
    """The image's own check, run here against the installed torch: it passes for the build the image wants and
    stops the build (non-zero, one line naming the fix) for the other."""
    import subprocess
    import sys

    import torch

    (check,) = _torch_checks(name)
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    if (torch.version.cuda is not None) == wants_cuda:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and "Fix:" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cpu_image_needs_the_cpu_wheel_index():
    runs = " ".join(a for i, a in dockerfile_instructions(DEPLOY / "Dockerfile.cpu") if i == "RUN")
    assert 'test -n "$TORCH_INDEX" ||' in runs and '--index-url "$TORCH_INDEX" torch==' in runs


def test_base_digest_placeholder_is_marked():
    """The digest cannot be looked up from here: where it is the all-zero placeholder, the file says so."""
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        if "@sha256:" + "0" * 64 in text:
            assert "PLACEHOLDER" in text and "imagetools inspect" in text, name


def test_cuda_image_layout():
    ins = dockerfile_instructions(DEPLOY / "Dockerfile.cuda")
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in env
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert (
        f"nvidia-ml-py=={pyproject_pins()['nvidia-ml-py']}" in runs
        and "import pipeline, distributed, torch, pynvml" in runs
    )


def test_cluster_requirements_are_pinned_like_pyproject():
    pins = cluster_pins()
    assert set(pins) == {"dask-jobqueue", "dask-gateway", "dask-kubernetes"}
    project = pyproject_pins()
    for pkg, ver in pins.items():
        if pkg in project:  # once pyproject.toml carries the 'cluster' extra, they must agree
            assert project[pkg] == ver, f"{pkg}: requirements-cluster.txt {ver} vs pyproject.toml {project[pkg]}"
    from importlib.metadata import PackageNotFoundError, version

    for pkg, ver in pins.items():  # and the environment the tests ran in has the same versions
        try:
            assert version(pkg) == ver, f"{pkg}: installed {version(pkg)}, pinned {ver}"
        except PackageNotFoundError:
            pass


# -- environment.yml ---------------------------------------------------------------------------------


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # the pip: section installs the project itself
            assert dep.get("pip") == ["-e ."], dep
            continue
        name, _, ver = dep.partition("=")
        conda[_norm(name)] = ver
    req = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert conda.pop("python") == req
    conda.pop("pip", None)
    want = {_norm(CONDA_NAMES.get(k, k)): v for k, v in pyproject_pins().items()}
    missing = sorted(set(want) - set(conda))
    extra = sorted(set(conda) - set(want))
    differ = sorted(k for k in set(want) & set(conda) if want[k] != conda[k])
    assert not (missing or extra or differ), (
        f"environment.yml vs pyproject.toml: missing {missing}, extra {extra}, "
        f"different versions {[(k, conda[k], want[k]) for k in differ]}"
    )


# -- what the installed libraries make of the deploy files --------------------------------------------


def _gateway_config():
    """The gateway's extraConfig run as the gateway server runs it: into a traitlets Config ``c``."""
    from traitlets.config import Config

    values = yaml.safe_load((DEPLOY / "gateway" / "values.yaml").read_text())
    c = Config()
    exec(values["gateway"]["extraConfig"]["mpm-options"], {"c": c})
    return c


def test_gateway_gpu_worker_as_the_server_and_a_worker_read_it():
    import dask
    from dask_gateway_server.backends.kubernetes.backend import KubeClusterConfig

    c = _gateway_config()
    chosen = c.Backend.cluster_options.get_configuration(
        {"worker_gpus": 1, "worker_cores": 8, "worker_memory": 60}, None
    )
    cluster = KubeClusterConfig(config=c, **chosen)  # the server's own validation of every field
    # limits with the requests
    assert cluster.worker_cores == cluster.worker_cores_limit == 8
    assert cluster.worker_memory == cluster.worker_memory_limit == 60 * 2**30
    # commands that the pinned distributed has
    assert cluster.worker_cmd == ["dask", "worker"] and cluster.scheduler_cmd == ["dask", "scheduler"]
    # the resource as a worker reads it from its environment: "GPU", the name the tasks ask for
    worker = dask.config.collect_env(cluster.environment)["distributed"]["worker"]
    assert worker["resources"] == {"GPU": 1} and worker["daemon"] is False
    assert dask.config.collect_env({"DASK_DISTRIBUTED__WORKER__RESOURCES__GPU": "1"}) == {
        "distributed": {"worker": {"resources": {"gpu": 1}}}
    }  # why the mapping is one value: the per-key form is lower-cased
    assert cluster.worker_extra_container_config["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cluster.worker_extra_pod_config["securityContext"]["runAsNonRoot"] is True
    assert cluster.scheduler_extra_pod_config["securityContext"]["runAsNonRoot"] is True
    cpu = KubeClusterConfig(config=c, **c.Backend.cluster_options.get_configuration({}, None))
    assert "DASK_DISTRIBUTED__WORKER__RESOURCES" not in cpu.environment


def test_gateway_commands_exist_in_the_pinned_distributed():
    from importlib.metadata import entry_points

    cli = {e.name for e in entry_points(group="dask_cli")}
    assert {"worker", "scheduler"} <= cli
    scripts = {e.name for e in entry_points(group="console_scripts")}
    assert "dask" in scripts and "dask-worker" not in scripts


def test_gateway_is_a_named_jupyterhub_service(monkeypatch):
    from dask_gateway_server.auth import JupyterHubAuthenticator

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "unused")
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    assert JupyterHubAuthenticator(config=_gateway_config()).jupyterhub_service_name == "dask-gateway"
    text = (DEPLOY / "gateway" / "values.yaml").read_text()
    assert "--repo https://helm.dask.org" in text  # a chart repository that exists, not a placeholder


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec of a DaskCluster or DaskJob."""
    spec = doc["spec"]
    cluster = spec["cluster"]["spec"] if doc["kind"] == "DaskJob" else spec
    pods = [cluster["worker"]["spec"], cluster["scheduler"]["spec"]]
    if doc["kind"] == "DaskJob":
        pods.append(spec["job"]["spec"])
    return pods


@pytest.mark.parametrize("name", ["daskcluster-gpu.yaml", "daskjob-gpu.yaml"])
def test_every_pod_runs_unprivileged_and_parses_as_a_pod_spec(name):
    from kubernetes.client import ApiClient

    api = ApiClient()

    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d and "Dask" in d["kind"]]
    pods = [p for d in docs for p in _pod_specs(d)]
    assert len(pods) == (3 if name.startswith("daskjob") else 2)
    for pod in pods:
        model = api.deserialize(json.dumps(pod), "V1PodSpec", "application/json")
        # every key is one the Kubernetes API knows (an unknown one would be dropped by the round trip)
        assert api.sanitize_for_serialization(model) == pod
        assert model.security_context.run_as_non_root is True and model.security_context.fs_group == 1000
        for c in model.containers:
            assert c.security_context.capabilities.drop == ["ALL"], c.name
            assert c.security_context.allow_privilege_escalation is False, c.name


def test_daskjob_logs_command_names_the_runner_pod():
    pytest.importorskip("dask_kubernetes")
    from dask_kubernetes.operator.controller.controller import get_job_runner_pod_name

    job = _doc(DEPLOY / "kubernetes" / "daskjob-gpu.yaml", "DaskJob")
    pod = get_job_runner_pod_name(job["metadata"]["name"])
    text = (DEPLOY / "kubernetes" / "daskjob-gpu.yaml").read_text()
    assert f"kubectl -n {job['metadata']['namespace']} logs -f pod/{pod}" in text

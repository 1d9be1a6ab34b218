"""deploy/ against the Kubernetes schemas (offline, ``kubernetes-validate``'s bundled ones) and against the server.

Every YAML document under deploy/ is loaded. Core kinds are validated with the strict schemas (unknown
fields are errors) of the oldest Kubernetes the manifests claim (1.30: the preStop ``sleep`` action) and
of the newest bundled one. The KServe InferenceService is a CRD without a bundled schema: its predictor's
pod spec is validated as a core Pod, its rollout strategy as a core Deployment's, and the rest is asserted.

The cross-checks tie the manifests to the code: the container's command line (the Dockerfile's ENTRYPOINT
plus ``args``) parses with the server's own parser, the container ports are the ports it binds, probes hit
routes of ``server.frontends.http`` on the HTTP port, Service targets are container ports, the token variable is
``stadapter_api.wire``'s, the grace period covers the drain, the user is the Dockerfile's.
Each check is also run on a broken copy, which must fail it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version, validate

from server.config import ServerConfig, build_parser, parse_args
from server.frontends.http import HttpService
from stadapter_api.wire import ADMIN_TOKEN_ENV

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OLDEST_K8S = "1.30"  # lifecycle.preStop.sleep is beta (on by default) from 1.30
K8S_VERSIONS = (OLDEST_K8S, ".".join(latest_version().split(".")[:2]))
EXPECTED_KINDS = {"PersistentVolumeClaim", "Deployment", "Service", "ConfigMap", "InferenceService", "Kustomization"}
# KServe's ComponentExtensionSpec: predictor fields that are not PodSpec fields (pkg/apis/serving/v1beta1/component.go)
KSERVE_EXTENSION = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy"}
KSERVE_FRAMEWORKS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
                     "paddle", "model", "storageUris", "workerSpec"}
SHUTDOWN_MARGIN_S = 5  # after the drain: the gRPC stop grace (1 s), HTTP, batcher and decoder shutdown


def documents() -> Iterator[tuple[Path, dict]]:
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


DOCS = list(documents())


def one(kind: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/, found {len(found)}"
    return found[0]


def dockerfile() -> dict[str, Any]:
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M).group(1))
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.M)
    expose = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    start = re.search(r"--start-period=(\d+)s", text)
    return {"entrypoint": entry, "uid": int(user.group(1)), "gid": int(user.group(2) or user.group(1)),
            "expose": expose, "start_period_s": int(start.group(1)) if start else 0}


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- the pod specs: the Deployment's template and the InferenceService's predictor ------------------------------


def isvc_pod_spec(isvc: dict) -> dict:
    predictor = isvc["spec"]["predictor"]
    return {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION}


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(name, pod spec, the pod's metadata) of every pod the manifests make."""
    dep, isvc = one("Deployment"), one("InferenceService")
    return [("Deployment", dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]),
            ("InferenceService", isvc_pod_spec(isvc), {"annotations": isvc["spec"]["predictor"].get("annotations", {})})]


def server_container(spec: dict) -> dict:
    assert len(spec["containers"]) == 1, "one server container per pod"
    return spec["containers"][0]


def server_config(container: dict) -> ServerConfig:
    """The ServerConfig the container's command line gives (the Dockerfile's ENTRYPOINT + args, as Kubernetes runs it)."""
    entry = dockerfile()["entrypoint"]
    assert entry[:3] == ["python", "-m", "server"], entry
    assert "command" not in container, "`command` would replace the image's ENTRYPOINT (its ports and /models)"
    args = [str(a) for a in container.get("args", [])]
    known = {o for a in build_parser()._actions for o in a.option_strings}
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"not flags of python -m server: {unknown}"
    try:
        return parse_args(entry[3:] + args)
    except SystemExit as e:  # argparse's error (printed on stderr) for a bad value
        raise AssertionError(f"python -m server {' '.join(entry[3:] + args)} does not parse (exit {e.code})") from None


def port_number(container: dict, port: int | str) -> int:
    """A probe's or Service's port (a number, or a container port's name) as the container port it reaches."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    number = by_name.get(port) if isinstance(port, str) else port
    assert number in {p["containerPort"] for p in container["ports"]}, f"port {port!r} is not a container port"
    return number


def http_routes() -> set[str]:
    app = HttpService.__new__(HttpService).application()  # the real route table; handlers are not called
    return {r.canonical for r in app.router.resources()}


def check_pod(spec: dict, meta: dict) -> None:
    c = server_container(spec)
    cfg = server_config(c)
    assert cfg.host == "0.0.0.0", "the server must listen on the pod's address, not only loopback"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    binds = {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}
    assert ports == binds, f"container ports {ports} are not the ports the server binds {binds}"
    assert set(ports.values()) <= dockerfile()["expose"], "a container port the Dockerfile does not EXPOSE"
    routes = http_routes()
    for probe, path in (("startupProbe", "/v2/health/live"), ("livenessProbe", "/v2/health/live"),
                        ("readinessProbe", "/v2/health/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in routes, f"{probe} should GET {path} (routes: {sorted(routes)})"
        assert port_number(c, get["port"]) == cfg.http_port, f"{probe} is not on the HTTP port {cfg.http_port}"
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= dockerfile()["start_period_s"], \
        "the startup budget is shorter than the image's own HEALTHCHECK start period"
    env = {e["name"]: e for e in c.get("env", [])}
    assert "secretKeyRef" in env.get(ADMIN_TOKEN_ENV, {}).get("valueFrom", {}), f"{ADMIN_TOKEN_ENV} from a Secret"
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    need = pre_stop + cfg.drain_timeout_s + SHUTDOWN_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] >= need, \
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < preStop + drain + margin = {need}"
    d = dockerfile()
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] and (sc["runAsUser"], sc["runAsGroup"]) == (d["uid"], d["gid"]), sc
    assert c["image"] == f"stadapter-serve:{project_version()}", c["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[str(cfg.model_repository)]]["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim")
    assert claim == pvc["metadata"]["name"] and "ReadWriteMany" in pvc["spec"]["accessModes"]
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "decoded frames travel through /dev/shm"
    ann = meta.get("annotations", {})
    scrape_port = ann.get("prometheus.io/port") or ann.get("prometheus.kserve.io/port")
    assert scrape_port is not None and int(scrape_port) == cfg.metrics_port, ann


def check_service(svc: dict, dep: dict) -> None:
    template = dep["spec"]["template"]
    assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items(), "the Service selects no pod"
    c = server_container(template["spec"])
    cfg = server_config(c)
    targets = {p["name"]: port_number(c, p["targetPort"]) for p in svc["spec"]["ports"]}
    assert targets == {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}, targets
    assert all(p.get("appProtocol") for p in svc["spec"]["ports"]), "every port names its appProtocol"


def check_scrape_config(cm: dict, svc: dict) -> None:
    prom = yaml.safe_load(cm["data"]["prometheus.yml"])
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "stadapter-serve"]
    assert job["metrics_path"] == "/metrics"
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_service_label_app_kubernetes_io_name"] == svc["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep["__meta_kubernetes_endpointslice_port_name"] in {p["name"] for p in svc["spec"]["ports"]}


def check_isvc(isvc: dict) -> None:
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert not KSERVE_FRAMEWORKS & predictor.keys(), "a custom predictor: containers only, no model format"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    c = server_container(isvc_pod_spec(isvc))
    assert c["name"] == "kserve-container"
    assert {e["name"]: e.get("value") for e in c["env"]}.get("PROTOCOL") == "v2", "KServe reads a custom predictor's protocol here"
    assert c["ports"][0]["containerPort"] == server_config(c).http_port, "raw mode sends REST to the first port"
    assert predictor.get("minReplicas", 1) <= predictor["maxReplicas"]


# --- schema validation ------------------------------------------------------------------------------------------


def schema_checked(doc: dict) -> list[dict]:
    """The core objects validating ``doc`` means: itself, or for the InferenceService a Pod (and a Deployment)."""
    if (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService"):
        predictor = doc["spec"]["predictor"]
        meta = {"name": doc["metadata"]["name"], "labels": predictor.get("labels", {}),
                "annotations": predictor.get("annotations", {})}
        out = [{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": isvc_pod_spec(doc)}]
        if "deploymentStrategy" in predictor:
            out.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": meta["name"]},
                        "spec": {"selector": {"matchLabels": {"app": meta["name"]}}, "strategy": predictor["deploymentStrategy"],
                                 "template": {"metadata": {"labels": {"app": meta["name"]}}, "spec": isvc_pod_spec(doc)}}})
        return out
    if (doc["apiVersion"], doc["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
        return []
    return [doc]


def test_deploy_holds_the_expected_objects():
    assert {d["kind"] for _, d in DOCS} == EXPECTED_KINDS
    for path, doc in DOCS:
        assert doc["kind"] == "Kustomization" or doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"


def test_a_kind_without_a_schema_is_not_passed():
    with pytest.raises(SchemaNotFoundError):
        validate({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"}},
                 OLDEST_K8S, strict=True)


def test_kustomization_lists_every_manifest():
    k = one("Kustomization")
    here = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == here


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_manifests():
    r = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(r.stdout))
    files = sorted((d["kind"], d["metadata"]["name"]) for p, d in DOCS
                   if p.parent == DEPLOY / "kubernetes" and d["kind"] != "Kustomization")
    assert rendered == files


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path,doc", DOCS, ids=[f"{p.relative_to(DEPLOY)}:{d['kind']}" for p, d in DOCS])
def test_manifest_is_valid(path, doc, version):
    errors = []
    for obj in schema_checked(doc):
        try:
            validate(obj, version, strict=True)
        except ValidationError as e:
            errors.append(f"{path.relative_to(ROOT)} ({obj['kind']}) is not valid Kubernetes {version}: "
                          f"{'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_pods_match_the_server():
    errors = []
    for name, spec, meta in pod_specs():
        try:
            check_pod(spec, meta)
        except (AssertionError, KeyError) as e:
            errors.append(f"{name}: {e!r}")
    assert not errors, "\n".join(errors)


def test_service_reaches_the_container_ports():
    check_service(one("Service"), one("Deployment"))


def test_scrape_config_targets_the_metrics_port():
    check_scrape_config(one("ConfigMap"), one("Service"))


def test_inferenceservice_is_a_custom_oip_predictor():
    check_isvc(one("InferenceService"))


def promtool_check(config: dict, folder: Path) -> subprocess.CompletedProcess:
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    return subprocess.run(["promtool", "check", "config", str(folder / "prometheus.yml")], capture_output=True, text=True)


def without_kubernetes_sd(config: dict) -> dict:
    """The config with each job's Kubernetes discovery swapped for a static target (relabelling and the rest kept)."""
    out = copy.deepcopy(config)
    for job in out["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    return out


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_scrape_config(tmp_path):
    config = yaml.safe_load(one("ConfigMap")["data"]["prometheus.yml"])
    r = promtool_check(config, tmp_path)
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian's Prometheus is built without Kubernetes discovery: check everything else
        r = promtool_check(without_kubernetes_sd(config), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = copy.deepcopy(config)
    broken["scrape_configs"][0]["relabel_configs"][0]["action"] = "kep"
    assert promtool_check(without_kubernetes_sd(broken), tmp_path).returncode != 0, "promtool took a broken config"


# --- a broken copy fails each check ---------------------------------------------------------------------------


def _deployment_with(edit: Callable[[dict], None]) -> dict:
    dep = copy.deepcopy(one("Deployment"))
    edit(dep)
    return dep


def _container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


SCHEMA_BREAKS = {
    "misspelt field": lambda d: _container(d).__setitem__("livenesProbe", _container(d).pop("livenessProbe")),
    "port as text": lambda d: _container(d)["ports"][0].__setitem__("containerPort", "fifty thousand"),
    "no selector": lambda d: d["spec"].pop("selector"),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS)
def test_a_broken_manifest_fails_validation(case):
    with pytest.raises(ValidationError):
        validate(_deployment_with(SCHEMA_BREAKS[case]), OLDEST_K8S, strict=True)


CROSS_BREAKS = {
    "invented flag": (lambda d: _container(d)["args"].append("--drain-timeout"), "not flags of python -m server"),
    "bad flag value": (lambda d: _container(d)["args"].extend(["--http-port", "-5"]), "does not parse"),
    "probe on metrics": (lambda d: _container(d)["readinessProbe"]["httpGet"].__setitem__("port", "metrics"),
                         "not on the HTTP port"),
    "unknown route": (lambda d: _container(d)["livenessProbe"]["httpGet"].__setitem__("path", "/healthz"), "should GET"),
    "renamed token": (lambda d: _container(d)["env"][0].__setitem__("name", "ADMIN_TOKEN"), ADMIN_TOKEN_ENV),
    "short grace": (lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", 30),
                    "terminationGracePeriodSeconds"),
    "root user": (lambda d: d["spec"]["template"]["spec"]["securityContext"].__setitem__("runAsUser", 0), "runAsUser"),
    "wrong port": (lambda d: _container(d)["ports"][1].__setitem__("containerPort", 8080), "ports"),
}


@pytest.mark.parametrize("case", CROSS_BREAKS)
def test_a_manifest_at_odds_with_the_server_fails_the_cross_check(case):
    edit, text = CROSS_BREAKS[case]
    dep = _deployment_with(edit)
    with pytest.raises(AssertionError, match=re.escape(text)):
        check_pod(dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"])


def test_a_service_aimed_elsewhere_fails_the_cross_check():
    svc = copy.deepcopy(one("Service"))
    svc["spec"]["ports"][0]["targetPort"] = 50052
    with pytest.raises(AssertionError, match="not a container port"):
        check_service(svc, one("Deployment"))
    svc = copy.deepcopy(one("Service"))
    svc["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    with pytest.raises(AssertionError, match="selects no pod"):
        check_service(svc, one("Deployment"))


def test_an_isvc_without_the_protocol_fails_the_check():
    isvc = copy.deepcopy(one("InferenceService"))
    isvc["spec"]["predictor"]["containers"][0]["env"] = [e for e in isvc["spec"]["predictor"]["containers"][0]["env"]
                                                         if e["name"] != "PROTOCOL"]
    with pytest.raises(AssertionError, match="protocol"):
        check_isvc(isvc)
    isvc = copy.deepcopy(one("InferenceService"))
    isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["initialDelay"] = 5  # not a Probe field
    with pytest.raises(ValidationError):
        validate(schema_checked(isvc)[0], OLDEST_K8S, strict=True)

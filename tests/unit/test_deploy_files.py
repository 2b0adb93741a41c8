"""The deployment files under deploy/: they parse, agree with each other and with the code.

* compose and Kubernetes YAML parse; every tailstream service runs the same image;
* every ``TAILSTREAM_*`` variable they set is a real setting, and the values convert;
* ports, volumes, model store paths, selectors and scrape targets line up;
* every metric named in the Grafana dashboard and the alert rules is exported by a fresh
  ``Metrics()`` / ``TrainerMetrics()`` registry, with the labels the queries use;
* ``promtool check config``, ``promtool check rules`` and ``promtool test rules`` (alert
  behaviour on synthetic series) pass; skipped, naming the binary, where promtool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tailstream.metrics import Metrics, TrainerMetrics
from tailstream.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose" / "compose.cpu.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tailstream.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

SETTING_NAMES = frozenset(f.name for f in fields(Settings))
TAILSTREAM_SERVICES = {"topics", "worker", "trainer", "producer"}
LAG_METRIC = "tailstream_consumer_lag_messages"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
METRIC_RE = re.compile(r"(?<![\w:])(tailstream_[a-z0-9_]+)(?![\w:])")


# --------------------------------------------------------------------------- helpers
class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's merge tags (``!reset``, ``!override``)."""


def _compose_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    else:
        raise TypeError(f"unexpected YAML node {node!r}")
    return {f"!{tag_suffix}": value}


_ComposeLoader.add_multi_constructor("!", _compose_tag)


def load_yaml(path: Path) -> Any:
    with path.open() as fh:
        return yaml.load(fh, Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose interpolation with every host variable unset: ``${X:-d}`` → ``d``."""
    text = str(value).replace("$$", "\x00")
    text = _INTERPOLATION.sub(lambda m: m.group(2) or "", text)
    return text.replace("\x00", "$")


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(v) for k, v in env.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """Series names a fresh worker and trainer registry export → their label names.

    Counters export ``_total`` (and ``_created``), histograms ``_bucket`` (with ``le``),
    ``_sum``, ``_count``; gauges their own name. Label names come from the collectors,
    because a labelled metric has no samples until a child is created.
    """
    out: dict[str, tuple[str, ...]] = {}
    for registry in (Metrics().registry, TrainerMetrics().registry):
        labels_of = _labelnames(registry)
        for family in registry.collect():
            labels = labels_of.get(family.name, ())
            if family.type == "counter":
                out[family.name + "_total"] = labels
                out[family.name + "_created"] = labels
            elif family.type == "histogram":
                out[family.name + "_bucket"] = (*labels, "le")
                for suffix in ("_sum", "_count", "_created"):
                    out[family.name + suffix] = labels
            elif family.type == "summary":
                out[family.name] = (*labels, "quantile")
                for suffix in ("_sum", "_count", "_created"):
                    out[family.name + suffix] = labels
            else:
                out[family.name] = labels
            for sample in family.samples:
                out.setdefault(sample.name, labels)
    return out


def _labelnames(registry: CollectorRegistry) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    collectors = getattr(registry, "_collector_to_names", {})
    for collector in collectors:
        name = getattr(collector, "_name", None)
        if name is None:
            continue
        base = name[: -len("_total")] if name.endswith("_total") else name
        found[base] = tuple(getattr(collector, "_labelnames", ()))
    return found


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels") or [])


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard_panels(dash["panels"]) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc.get("kind") == kind}


def configmap_env() -> dict[str, str]:
    (cm,) = k8s_objects("ConfigMap").values()
    return {k: str(v) for k, v in cm["data"].items()}


def secret_env() -> dict[str, str]:
    (secret,) = k8s_objects("Secret").values()
    return {k: str(v) for k, v in (secret.get("stringData") or {}).items()}


def containers(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


# --------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "prometheus", "grafana", *TAILSTREAM_SERVICES} <= set(services)
    assert "zookeeper" not in services


def test_every_tailstream_service_runs_the_same_image_and_build(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    ours = {name for name, svc in services.items() if "build" in svc}
    assert ours == TAILSTREAM_SERVICES
    images = {interpolate(services[name]["image"]) for name in ours}
    builds = {json.dumps(services[name]["build"], sort_keys=True) for name in ours}
    assert len(images) == 1, f"tailstream services use different images: {images}"
    assert len(builds) == 1
    build = services["worker"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    # Non-tailstream services never use that image.
    (image,) = images
    assert all(interpolate(svc.get("image", "")) != image
               for name, svc in services.items() if name not in ours)
    commands = {name: command_of(services[name]) for name in ours}
    assert commands["worker"] == ["tailstream", "worker"]
    assert commands["trainer"] == ["tailstream", "trainer"]
    assert commands["producer"][:3] == ["tailstream", "produce", "synthetic"]
    assert "--rate" in commands["producer"]
    assert "create_topics" in " ".join(commands["topics"])


def test_dockerfile_builds_python_311_slim_with_cpu_torch_by_default() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    # Every folder pyproject maps into the package is copied into the build.
    for folder in ("src", "streams", "models", "producers", "bench"):
        if (ROOT / folder).is_dir():
            assert re.search(rf"^COPY {folder} ", text, re.M), folder
    assert "TAILSTREAM_WEB_HOST=0.0.0.0" in text
    assert re.search(r"^USER \d+", text, re.M), "the image runs as an unprivileged user"


def test_kafka_is_a_single_kraft_node_of_the_official_image(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    internal = dict(item.split("://", 1) for item in
                    env["KAFKA_ADVERTISED_LISTENERS"].split(","))["INTERNAL"]
    for name in TAILSTREAM_SERVICES:
        assert env_of(compose["services"][name])["TAILSTREAM_KAFKA_BOOTSTRAP"] == internal


def test_redis_keeps_an_append_only_file_and_the_password_matches(
        compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = [interpolate(c) for c in command_of(redis)]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    password = cmd[cmd.index("--requirepass") + 1]
    for name in TAILSTREAM_SERVICES:
        url = env_of(compose["services"][name])["TAILSTREAM_REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0"


def test_compose_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in TAILSTREAM_SERVICES:
        env = env_of(services[name])
        unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {
            ENV_PREFIX + n.upper() for n in SETTING_NAMES}
        assert not unknown, f"{name}: not settings: {unknown}"
        s = Settings.from_env(env)  # converts every value (ints, paths, secrets)
        assert s.web_host == "0.0.0.0", f"{name} must listen on every interface"
        assert s.kafka_bootstrap and s.redis_url
    worker = Settings.from_env(env_of(services["worker"]))
    trainer = Settings.from_env(env_of(services["trainer"]))
    assert worker.model_store_dir == trainer.model_store_dir
    assert worker.app_id == trainer.app_id and worker.partitions == trainer.partitions


def test_host_variables_never_look_like_settings() -> None:
    """The CLI rejects unknown TAILSTREAM_* variables: host-side knobs must not use it."""
    for path in (COMPOSE, COMPOSE_CPU):
        for var in _INTERPOLATION.findall(path.read_text()):
            name = var[0]
            if name.startswith(ENV_PREFIX):
                assert name[len(ENV_PREFIX):].lower() in SETTING_NAMES, (path, name)


def test_trainer_and_workers_share_the_model_store_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def model_volume(name: str) -> tuple[str, bool]:
        target = str(Settings.from_env(env_of(services[name])).model_store_dir)
        for spec in services[name].get("volumes", []):
            parts = spec.split(":")
            if parts[1] == target:
                return parts[0], parts[2:] == ["ro"]
        raise AssertionError(f"{name} mounts nothing at its model store {target}")

    worker_vol, worker_ro = model_volume("worker")
    trainer_vol, trainer_ro = model_volume("trainer")
    assert worker_vol == trainer_vol and worker_vol in compose["volumes"]
    assert worker_ro and not trainer_ro


def test_trainer_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("count", 0) >= 1 for d in devices)
    cpu = load_yaml(COMPOSE_CPU)
    assert set(cpu["services"]) <= set(compose["services"])
    reset = cpu["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert reset == {"!reset": []}
    assert env_of(cpu["services"]["trainer"])["TAILSTREAM_DEVICE"] == "cpu"


def test_workers_start_after_the_topics_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("worker", "trainer"):
        dep = services[name]["depends_on"]
        assert dep["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["restart"] == "no"
    assert "container_name" not in services["worker"], "fixed names prevent --scale worker=N"


def test_bind_mounts_exist_and_prometheus_scrapes_the_services(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
    prom = load_yaml(PROMETHEUS_YML)
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    worker_env = Settings.from_env(env_of(services["worker"]))
    trainer_env = Settings.from_env(env_of(services["trainer"]))
    (dns,) = jobs["tailstream-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == worker_env.web_port
    (static,) = jobs["tailstream-trainer"]["static_configs"]
    assert static["targets"] == [f"trainer:{trainer_env.trainer_port}"]
    assert prom["rule_files"] == ["alerts.yml"]
    mounted = {spec.split(":")[1] for spec in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted


def test_grafana_provisioning_points_at_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {spec.split(":")[1]: (COMPOSE.parent / spec.split(":")[0]).resolve()
              for spec in grafana["volumes"] if spec.startswith(".")}
    (ds,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "tailstream.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    dash = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"] and target["expr"].strip()


def test_dashboard_covers_the_required_views() -> None:
    exprs = " ".join(dashboard_exprs())
    for needed in ("tailstream_events_in_total", "tailstream_class_share_ratio",
                   "tailstream_loss_weight_ratio", "tailstream_buffer_samples",
                   "tailstream_finetune_runs_total", "tailstream_model_version_number",
                   "tailstream_serving_model_version_number",
                   "tailstream_recommendation_latency_seconds_bucket",
                   "tailstream_recommended_items_total", "tailstream_dlq_total", LAG_METRIC,
                   "tailstream_judged_lists_total", "tailstream_attributed_total",
                   "tailstream_impressions_total", "tailstream_online_hit_rate_ratio",
                   "tailstream_canaries_total"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


# --------------------------------------------------------------------------- metrics
def test_lag_metric_is_exported_with_topic_and_partition_labels() -> None:
    """The lag gauge is added to metrics.py separately; until then this test fails."""
    exported = exported_metrics()
    assert LAG_METRIC in exported, (
        f"{LAG_METRIC} is not exported by tailstream.metrics yet; the dashboard and "
        "alerts.yml use it (gauge, labels topic and partition)")
    assert set(exported[LAG_METRIC]) == {"topic", "partition"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_in_queries_is_exported(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    exported = exported_metrics()
    used = {name for expr in exprs for name in METRIC_RE.findall(expr)}
    assert used, "no tailstream metric found in the queries"
    missing = sorted(used - set(exported))
    assert not missing, f"{source} uses metrics no registry exports: {missing}"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_labels_the_metrics_have(source: str) -> None:
    """Label matchers ``m{l="v"}`` and ``by (l)`` over a metric name real labels."""
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    exported = exported_metrics()
    problems: list[str] = []
    for expr in exprs:
        for m in re.finditer(r"(tailstream_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
            allowed = set(exported.get(m.group(1), ())) | TARGET_LABELS
            for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2)):
                if m.group(1) in exported and label not in allowed:
                    problems.append(f"{m.group(1)}{{{label}}} in {expr!r}")
        for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr):
            inner = METRIC_RE.search(expr, m.end())
            if inner is None or inner.group(1) not in exported:
                continue
            allowed = set(exported[inner.group(1)]) | TARGET_LABELS
            for label in (x.strip() for x in m.group(1).split(",") if x.strip()):
                if label not in allowed:
                    problems.append(f"by ({label}) over {inner.group(1)} in {expr!r}")
    assert not problems, "\n".join(problems)


def test_alert_rules_cover_the_required_conditions() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    exprs = " ".join(r["expr"] for r in rules.values())
    for metric in (LAG_METRIC, "tailstream_dlq_total", "tailstream_finetune_failures_total",
                   "tailstream_last_promotion_timestamp_seconds",
                   "tailstream_recommendation_latency_seconds_bucket",
                   "tailstream_online_hit_rate_ratio", "tailstream_impressions_total",
                   "tailstream_tail_exposure_target_ratio"):
        assert metric in exprs, metric
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]


# --------------------------------------------------------------------------- kubernetes
def test_k8s_manifests_parse_and_are_namespaced() -> None:
    docs = k8s_docs()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service",
            "PersistentVolumeClaim", "ServiceMonitor", "Job"} <= kinds
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] == "Kustomization":
            listed = set(doc["resources"])
            assert all((K8S / name).is_file() for name in listed)
            on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
            # The ServiceMonitor needs the operator's CRDs: applied separately.
            assert on_disk - listed == {"servicemonitor.yaml"}
            continue
        assert doc["metadata"]["name"], path
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "tailstream", (path, doc["kind"])
    monitor = k8s_objects("ServiceMonitor")["tailstream"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"


def test_configmap_and_secret_hold_valid_settings() -> None:
    cm, secret = configmap_env(), secret_env()
    for key in [*cm, *secret]:
        assert key.startswith(ENV_PREFIX), key
        assert key[len(ENV_PREFIX):].lower() in SETTING_NAMES, f"{key} is not a setting"
    assert {"TAILSTREAM_KAFKA_SASL_PASSWORD", "TAILSTREAM_REDIS_URL"} <= set(secret)
    assert not {"TAILSTREAM_KAFKA_SASL_PASSWORD", "TAILSTREAM_REDIS_URL"} & set(cm)
    s = Settings.from_env({**cm, **secret})
    assert s.web_host == "0.0.0.0"
    assert s.kafka_security_protocol in {"SSL", "SASL_PLAINTEXT", "SASL_SSL"}
    # Every explicit env var in a pod is a setting too.
    for kind in ("Deployment", "Job"):
        for name, doc in k8s_objects(kind).items():
            for c in containers(doc):
                env = {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}
                Settings.from_env({**cm, **secret, **env})
                refs = {next(iter(ref.values()))["name"] for ref in c["envFrom"]}
                assert refs == {*k8s_objects("ConfigMap"), *k8s_objects("Secret")}, name


def test_images_are_one_repository_and_version() -> None:
    images = {c["image"] for kind in ("Deployment", "Job")
              for doc in k8s_objects(kind).values() for c in containers(doc)}
    repos = {image.rsplit(":", 1)[0] for image in images}
    tags = {image.rsplit(":", 1)[1].removesuffix("-cuda") for image in images}
    assert len(repos) == 1 and len(tags) == 1, images
    deployments = k8s_objects("Deployment")
    (trainer_c,) = containers(deployments["tailstream-trainer"])
    (worker_c,) = containers(deployments["tailstream-worker"])
    assert trainer_c["image"] == worker_c["image"] + "-cuda", "trainer: the CUDA build"
    assert worker_c["command"] == ["tailstream", "worker"]
    assert trainer_c["command"] == ["tailstream", "trainer"]


def test_worker_replicas_are_half_the_partitions() -> None:
    partitions = Settings.from_env(configmap_env()).partitions
    worker = k8s_objects("Deployment")["tailstream-worker"]
    assert worker["spec"]["replicas"] == partitions // 2
    text = (K8S / "worker.yaml").read_text()
    before = text[: text.index("replicas:")]
    assert "partition" in before[-800:].lower(), "explain scaling by partitions beside replicas"


def test_trainer_has_a_gpu_and_shares_the_model_store_with_workers() -> None:
    deployments = k8s_objects("Deployment")
    trainer, worker = deployments["tailstream-trainer"], deployments["tailstream-worker"]
    assert trainer["spec"]["replicas"] == 1
    assert trainer["spec"]["strategy"]["type"] == "Recreate"
    (tc,) = containers(trainer)
    assert str(tc["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert str(tc["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    (pvc,) = k8s_objects("PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    model_dir = str(Settings.from_env(configmap_env()).model_store_dir)

    def store_mount(doc: dict[str, Any]) -> dict[str, Any]:
        pod = doc["spec"]["template"]["spec"]
        claims = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName")
                  == pvc["metadata"]["name"]}
        (c,) = pod["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] in claims]
        assert mount["mountPath"] == model_dir
        return dict(mount)

    assert store_mount(worker).get("readOnly") is True
    assert not store_mount(trainer).get("readOnly", False)


def test_services_select_their_pods_and_expose_the_metrics_ports() -> None:
    cm = Settings.from_env(configmap_env())
    ports = {"tailstream-worker": cm.web_port, "tailstream-trainer": cm.trainer_port}
    deployments = k8s_objects("Deployment")
    services = k8s_objects("Service")
    assert set(services) == set(ports)
    for name, svc in services.items():
        pod = deployments[name]["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        assert deployments[name]["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        (c,) = pod["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        (port,) = svc["spec"]["ports"]
        assert named[port["targetPort"]] == port["port"] == ports[name]
        for notes in (pod["metadata"]["annotations"], svc["metadata"]["annotations"]):
            assert notes["prometheus.io/scrape"] == "true"
            assert notes["prometheus.io/port"] == str(ports[name])
    monitor = k8s_objects("ServiceMonitor")["tailstream"]
    assert "tailstream" in monitor["spec"]["namespaceSelector"]["matchNames"]
    for svc in services.values():
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"][
            "labels"].items()
        names = {p["name"] for p in svc["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names


# --------------------------------------------------------------------------- promtool
def _promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if found is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; "
                    "run .ci/install-services)")
    return found


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_checks_the_prometheus_config_and_rules() -> None:
    promtool = _promtool()
    config = _run([promtool, "check", "config", PROMETHEUS_YML.name], PROMETHEUS_YML.parent)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _run([promtool, "check", "rules", str(ALERTS_YML)], ROOT)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout + rules.stderr


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def _alert(at: str, name: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": dict(labels)} for labels in expected]}


W = {"job": "tailstream-worker", "instance": "w1:6066"}
T = {"job": "tailstream-trainer", "instance": "t1:6067"}


def _rule_tests() -> list[dict[str, Any]]:
    lag = LAG_METRIC
    events = "tailstream_events_processed_total"
    bucket = "tailstream_recommendation_latency_seconds_bucket"
    last = "tailstream_last_promotion_timestamp_seconds"
    return [
        {"interval": "1m",  # lag rising 100/min on clicks, high but flat on carts
         "input_series": [_series(lag, "0+100x40", topic="clicks", partition="0", **W),
                          _series(lag, "5000x40", topic="carts", partition="0", **W)],
         "alert_rule_test": [
             _alert("15m", "TailstreamConsumerLagGrowing"),  # pending, not firing yet
             _alert("30m", "TailstreamConsumerLagGrowing",
                    {"severity": "warning", "topic": "clicks"})]},
        {"interval": "1m",  # 2 % of 100 events/s dead-lettered
         "input_series": [_series("tailstream_events_in_total", "0+6000x30", kind="click", **W),
                          _series("tailstream_dlq_total", "0+120x30", reason="bad_json", **W)],
         "alert_rule_test": [_alert("20m", "TailstreamDLQRateHigh", {"severity": "warning"})]},
        {"interval": "1m",  # 0.5 %: below the threshold
         "input_series": [_series("tailstream_events_in_total", "0+6000x30", kind="click", **W),
                          _series("tailstream_dlq_total", "0+30x30", reason="bad_json", **W)],
         "alert_rule_test": [_alert("20m", "TailstreamDLQRateHigh")]},
        {"interval": "1m",  # 80 % of lists take 250-500 ms
         "input_series": [_series(bucket, "0+10x30", le="0.1", trigger="event", **W),
                          _series(bucket, "0+20x30", le="0.25", trigger="event", **W),
                          _series(bucket, "0+100x30", le="0.5", trigger="event", **W),
                          _series(bucket, "0+100x30", le="+Inf", trigger="event", **W)],
         "alert_rule_test": [_alert("20m", "TailstreamRecommendationLatencyHigh",
                                    {"severity": "warning"})]},
        {"interval": "1m",  # every list within 100 ms
         "input_series": [_series(bucket, "0+100x30", le="0.1", trigger="event", **W),
                          _series(bucket, "0+100x30", le="+Inf", trigger="event", **W)],
         "alert_rule_test": [_alert("20m", "TailstreamRecommendationLatencyHigh")]},
        {"interval": "1m",  # a cause's counter is born at 1 (first failure) at 20 min
         "input_series": [_series("tailstream_finetune_failures_total", "_x20 1x40",
                                  cause="cuda_oom", **T),
                          _series("tailstream_finetune_failures_total", "1x20 2x40",
                                  cause="nan_loss", **T)],
         "alert_rule_test": [
             _alert("25m", "TailstreamFinetuneFailed",
                    {"severity": "warning", "cause": "cuda_oom"},
                    {"severity": "warning", "cause": "nan_loss"}),
             _alert("55m", "TailstreamFinetuneFailed")]},  # nothing new for 30 min
        {"interval": "1m",  # stuck for 3 minutes (the rejoin cleared it), then for 10
         "input_series": [_series("tailstream_stuck_partitions", "0x5 5x3 0x5 5x20", **W)],
         "alert_rule_test": [
             _alert("9m", "TailstreamPartitionsStuck"),
             _alert("25m", "TailstreamPartitionsStuck", {"severity": "critical"})]},
        {"interval": "1m",  # promoted at t=60 s, events keep flowing
         "input_series": [_series(last, "60x500", **T),
                          _series(events, "0+600x500", kind="click", **W)],
         "alert_rule_test": [
             _alert("300m", "TailstreamNoModelPromotion"),
             _alert("400m", "TailstreamNoModelPromotion", {"severity": "info"}),
             _alert("400m", "TailstreamNoModelPromotionSinceStart")]},
        {"interval": "1m",  # never promoted since the trainer started, events flowing
         "input_series": [_series(last, "0x500", **T),
                          _series(events, "0+600x500", kind="click", **W)],
         "alert_rule_test": [
             _alert("300m", "TailstreamNoModelPromotionSinceStart"),
             _alert("400m", "TailstreamNoModelPromotionSinceStart", {"severity": "info"}),
             _alert("400m", "TailstreamNoModelPromotion")]},
        {"interval": "1m",  # never promoted, but no events either: nothing to learn from
         "input_series": [_series(last, "0x500", **T),
                          _series(events, "100x500", kind="click", **W)],
         "alert_rule_test": [_alert("400m", "TailstreamNoModelPromotionSinceStart")]},
        {"interval": "1m",  # the serving version's online hit rate 5 points under the
         # previous one's on 5,000 judged lists each; then only 1 point under
         "input_series": [
             _series("tailstream_online_hit_rate_ratio", "0.25x50 0.29x50", role="serving",
                     **T),
             _series("tailstream_online_hit_rate_ratio", "0.30x100", role="previous", **T),
             _series("tailstream_online_judged_lists", "5000x100", role="serving", **T),
             _series("tailstream_online_judged_lists", "5000x100", role="previous", **T)],
         "alert_rule_test": [
             _alert("20m", "TailstreamOnlineHitRateBelowPrevious"),  # pending
             _alert("40m", "TailstreamOnlineHitRateBelowPrevious", {"severity": "warning"}),
             _alert("90m", "TailstreamOnlineHitRateBelowPrevious")]},
        {"interval": "1m",  # far below, but judged on too few lists to say
         "input_series": [
             _series("tailstream_online_hit_rate_ratio", "0.10x60", role="serving", **T),
             _series("tailstream_online_hit_rate_ratio", "0.30x60", role="previous", **T),
             _series("tailstream_online_judged_lists", "200x60", role="serving", **T),
             _series("tailstream_online_judged_lists", "5000x60", role="previous", **T)],
         "alert_rule_test": [_alert("50m", "TailstreamOnlineHitRateBelowPrevious")]},
        {"interval": "1m",  # 10 % of the slots to tail items against a 20 % target, then 30 %
         "input_series": [
             _series("tailstream_impressions_total", "0+10x90 900+30x90", tier="tail",
                     model_version="v00002", **W),
             _series("tailstream_impressions_total", "0+90x90 8100+70x90", tier="head",
                     model_version="v00002", **W),
             _series("tailstream_tail_exposure_target_ratio", "0.2x180", **W)],
         "alert_rule_test": [
             _alert("20m", "TailstreamTailExposureBelowTarget"),  # pending
             _alert("75m", "TailstreamTailExposureBelowTarget", {"severity": "warning"}),
             _alert("170m", "TailstreamTailExposureBelowTarget")]},
        {"interval": "1m",  # a canary rolled back at 10 min, nothing since
         "input_series": [_series("tailstream_canaries_total", "0x10 1x110",
                                  outcome="rolled_back", **T)],
         "alert_rule_test": [
             _alert("15m", "TailstreamCanaryRolledBack", {"severity": "info"}),
             _alert("90m", "TailstreamCanaryRolledBack")]},
        {"interval": "1m",
         "input_series": [
             _series("tailstream_serving_model_version_number", "3x30", **W),
             _series("tailstream_serving_model_version_number", "2x30",
                     job="tailstream-worker", instance="w2:6066"),
             _series("tailstream_publish_errors_total", "0+10x30", sink="redis", **W),
             _series("up", "1x5 0x20", **W)],
         "alert_rule_test": [
             _alert("20m", "TailstreamServingVersionSkew", {"severity": "warning"}),
             _alert("20m", "TailstreamPublishErrors", {"severity": "warning", "sink": "redis"}),
             _alert("8m", "TailstreamTargetDown"),
             _alert("15m", "TailstreamTargetDown", {"severity": "critical", **W})]},
    ]


def test_promtool_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    promtool = _promtool()
    # promtool compares annotations exactly; the rules are tested without them (their
    # templates are checked by `promtool check rules` above).
    rules = load_yaml(ALERTS_YML)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tested = {case["alertname"] for t in _rule_tests() for case in t["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a test case"
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": _rule_tests()}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = _run([promtool, "test", "rules", "tests.yml"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_services_script_is_valid_bash() -> None:
    script = ROOT / ".ci" / "install-services"
    assert script.is_file()
    result = _run(["bash", "-n", str(script)], ROOT)
    assert result.returncode == 0, result.stderr

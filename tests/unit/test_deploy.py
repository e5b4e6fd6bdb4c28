"""The observability profile of docker-compose.yml, checked without Docker: the files parse,
Prometheus scrapes the example services where they serve their metrics, and every metric
its rules use is one mqkit exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mqkit.observability.prometheus import METRICS

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"

# A histogram's series on /metrics: its name with one of these suffixes.
_SERIES = ("_bucket", "_count", "_sum")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data = load(ROOT / "docker-compose.yml")
    assert isinstance(data, dict) and "services" in data
    return data


def example_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in data["services"].items()
        if "services" in service.get("profiles", [])
    }


def test_the_compose_file_parses_and_prometheus_is_in_its_own_profile():
    data = compose()
    prometheus = data["services"]["prometheus"]
    assert prometheus["profiles"] == ["observability"]
    assert prometheus["image"].startswith("prom/prometheus:")
    for volume in prometheus["volumes"]:
        source, target, *_ = volume.split(":")
        assert (ROOT / source).is_file(), f"{source} (mounted at {target}) is missing"
    mounted = {v.split(":")[1] for v in prometheus["volumes"]}
    config = load(PROMETHEUS / "prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "/etc/prometheus/prometheus.yml" in mounted
    for rule_file in config["rule_files"]:
        assert rule_file in mounted, f"{rule_file} is named in prometheus.yml but not mounted"


def test_prometheus_scrapes_every_example_service_on_its_metrics_port():
    data = compose()
    services = example_services(data)
    assert {"orders", "billing", "inventory", "notifications", "pricing"} <= set(services)
    ports = {name: s["environment"]["DEMO_METRICS_PORT"] for name, s in services.items()}
    config = load(PROMETHEUS / "prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"{name}:{port}" for name, port in ports.items()}


def rule_expressions() -> list[str]:
    rules = load(PROMETHEUS / "mqkit-rules.yml")
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_the_rules_use_is_one_mqkit_exports():
    used = {
        name
        for expr in rule_expressions()
        for name in re.findall(r"\bmqkit_[a-z_]+", expr)  # recording rules are mqkit:...
    }
    assert used, "the rules use no mqkit metric"
    exported = set(METRICS)
    unknown = set()
    for name in used:
        base = next((name.removesuffix(s) for s in _SERIES if name.endswith(s)), name)
        if name not in exported and base not in exported:
            unknown.add(name)
    assert not unknown, f"the rules use metrics mqkit does not export: {sorted(unknown)}"
    # and the rules watch what matters most
    assert {"mqkit_connection_up", "mqkit_messages_consumed_total"} <= used


def test_recording_rules_used_by_alerts_are_defined():
    rules = load(PROMETHEUS / "mqkit-rules.yml")
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    used = {
        name for expr in rule_expressions() for name in re.findall(r"\bmqkit:[a-z_:0-9]+", expr)
    }
    assert used <= recorded
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert all(r["annotations"]["summary"] for r in alerts)

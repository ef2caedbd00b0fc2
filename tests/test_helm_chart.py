"""The Helm chart, rendered and linted by Helm's own SDK (helm-python-sdk), its output validated against the
Kubernetes schemas (kubernetes-validate), and its server configuration read by the server's own parser."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from keyseal.ca.config import Config, parse_config
from keyseal.errors import UsageError
from keyseal.wrapping.local import LocalKek

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "keyseal"
KUBE_VERSION = "1.30.0"
ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Render, validate every manifest against the Kubernetes schemas (strict: no unknown fields), and index
    the documents by kind."""
    output = chart.render(values or {}, name="trust", namespace="spire")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, text in output.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def server_config(by_kind: dict[str, list[dict[str, Any]]]) -> Config:
    (configmap,) = by_kind["ConfigMap"]
    return parse_config(yaml.safe_load(configmap["data"]["config.yaml"]))


def container(by_kind: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = by_kind["Deployment"]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_lint_is_clean() -> None:
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render(chart: helm_python.Chart) -> None:
    by_kind = render(chart)
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Secret", "Service",
                               "ServiceAccount"]
    config = server_config(by_kind)
    assert config.store_type == "kubernetes" and config.kube_namespace == "spire"
    assert config.wrapping_provider == "local" and config.custody == "wrapped"
    assert "trust-keyseal.spire.svc" in config.tls.self_issued_dns
    main = container(by_kind)
    assert main["args"] == ["server", "--config", "/etc/keyseal/config.yaml"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert main[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert main["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    (service,) = by_kind["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "https"


def test_rbac_is_limited_to_the_crd(chart: helm_python.Chart) -> None:
    by_kind = render(chart)
    (role,) = by_kind["Role"]
    assert role["rules"] == [{"apiGroups": ["keyseal.dev"], "resources": ["wrappedkeys"],
                              "verbs": ["get", "create", "update"]}]
    (binding,) = by_kind["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trust-keyseal", "namespace": "spire"}]
    assert "ClusterRole" not in by_kind and "ClusterRoleBinding" not in by_kind


def test_local_kek_secret_is_a_usable_kek(chart: helm_python.Chart, tmp_path: Path) -> None:
    by_kind = render(chart)
    (secret,) = by_kind["Secret"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    content = base64.b64decode(secret["data"]["kek"])
    kek_file = tmp_path / "kek"
    kek_file.write_bytes(content)
    os.chmod(kek_file, 0o400)  # as the pod mounts it (defaultMode 0400)
    kek = LocalKek(kek_file)
    kek.canary()
    assert len(kek.kek_id) == 32
    # The Secret is mounted where the server configuration looks for the KEK file.
    config = server_config(by_kind)
    main = container(by_kind)
    mount = next(m for m in main["volumeMounts"] if m["name"] == "kek")
    assert str(config.local_kek_file) == f"{mount['mountPath']}/kek"
    (deployment,) = by_kind["Deployment"]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "kek")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o400


def test_awskms_requires_the_key_arn(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="kmsKeyARN"):
        chart.render({"keyWrapping": {"provider": "awskms"}}, name="trust", namespace="spire")
    with pytest.raises(helm_python.HelmValuesError, match="kmsKeyARN"):
        chart.render({"keyWrapping": {"provider": "awskms"}, "aws": {"kmsKeyARN": "alias/keyseal"}},
                     name="trust", namespace="spire")


def test_awskms_with_irsa(chart: helm_python.Chart) -> None:
    role = "arn:aws:iam::111122223333:role/keyseal"
    by_kind = render(chart, {
        "keyWrapping": {"provider": "awskms"},
        "aws": {"kmsKeyARN": ARN, "region": "eu-west-1", "endpoints": {"kms": "https://kms.example.internal"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": role}},
    })
    assert "Secret" not in by_kind  # no local KEK
    config = server_config(by_kind)
    assert config.kek_spec() == f"awskms:{ARN}"
    assert config.kms_endpoint == "https://kms.example.internal"
    (account,) = by_kind["ServiceAccount"]
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    (deployment,) = by_kind["Deployment"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in container(by_kind)["env"]
    notes = chart.render({"keyWrapping": {"provider": "awskms"}, "aws": {"kmsKeyARN": ARN}}, name="trust",
                         namespace="spire")["keyseal/templates/NOTES.txt"]
    assert f"Key wrapping via KMS keyARN={ARN}" in notes


def test_key_manager_custody_needs_no_store_rbac(chart: helm_python.Chart) -> None:
    by_kind = render(chart, {"custody": "kms", "ca": {"keyType": "ec-p384"}})
    assert "Role" not in by_kind and "Secret" not in by_kind
    config = server_config(by_kind)
    assert config.custody == "kms" and config.ca_key_type == "ec-p384"


def test_schema_refuses_mistakes(chart: helm_python.Chart) -> None:
    for values in ({"custody": "hsm"}, {"keyWrapping": {"provider": "vault"}}, {"trustDomain": "Bad Domain"},
                   {"ca": {"keyType": "ed25519"}}, {"x509SVID": {"ttl": "one hour"}}, {"aws": {"kmsKeyArn": ARN}},
                   {"store": {"type": "directory"}},  # two replicas on a directory, and no volume
                   {"clients": [{"name": "a", "tokenSHA256": "plain-token", "allowedPathPrefixes": ["/a"]}]}):
        with pytest.raises(helm_python.HelmValuesError):
            chart.render(values, name="trust", namespace="spire")


def test_directory_store_and_tls_secret(chart: helm_python.Chart) -> None:
    by_kind = render(chart, {"store": {"type": "directory"}, "replicaCount": 1,
                             "persistence": {"existingClaim": "keyseal-data"}, "tls": {"existingSecret": "ks-tls"}})
    assert "Role" not in by_kind
    (deployment,) = by_kind["Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "keyseal-data"}
    assert volumes["tls"]["secret"]["secretName"] == "ks-tls"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    config = server_config(by_kind)
    assert str(config.tls.cert_file) == "/etc/keyseal/tls/tls.crt"
    assert config.store_type == "directory"


def test_clients_reach_the_server_config(chart: helm_python.Chart) -> None:
    digest = "a" * 64
    by_kind = render(chart, {"clients": [{"name": "team-a", "tokenSHA256": digest,
                                          "allowedPathPrefixes": ["/ns/team-a"]}]})
    (client,) = server_config(by_kind).clients
    assert (client.name, client.token_sha256, client.prefixes) == ("team-a", digest, ("/ns/team-a",))


def test_chart_crd_is_the_shipped_crd(chart: helm_python.Chart) -> None:
    shipped = ROOT / "deploy" / "crds" / "wrappedkeys.keyseal.dev.yaml"
    in_chart = CHART / "crds" / "wrappedkeys.keyseal.dev.yaml"
    assert in_chart.read_bytes() == shipped.read_bytes()
    (crd,) = chart.crds
    document = yaml.safe_load(crd["data"])
    kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    assert document["spec"]["names"]["plural"] == "wrappedkeys"


def test_vault_transit_kek(chart: helm_python.Chart) -> None:
    """keyWrapping.provider vault needs vault.address and vault.transitKey; the server config names the Transit
    key, no local KEK Secret is made, and a second provider's KEK is refused by the server's own parser."""
    for missing in ({}, {"address": "https://vault.example.org:8200"}, {"transitKey": "keyseal-kek"}):
        with pytest.raises(helm_python.HelmValuesError, match=r"address|transitKey"):
            chart.render({"keyWrapping": {"provider": "vault"}, "vault": missing}, name="trust", namespace="spire")
    vault = {"address": "https://vault.example.org:8200", "transitKey": "keyseal-kek", "kubernetesRole": "keyseal"}
    by_kind = render(chart, {"keyWrapping": {"provider": "vault"}, "vault": vault})
    assert "Secret" not in by_kind
    config = server_config(by_kind)
    assert config.kek_spec() == "vault:transit/keyseal-kek"
    assert config.vault is not None and config.vault.kubernetes_role == "keyseal"
    both = render(chart, {"keyWrapping": {"provider": "vault"}, "vault": vault, "aws": {"kmsKeyARN": ARN}})
    with pytest.raises(UsageError, match="exactly one KEK provider"):
        server_config(both)

"""The Helm chart, rendered and linted by Helm's own SDK (helm-python-sdk), its output validated against the
Kubernetes schemas (kubernetes-validate), and its server configuration read by the server's own parser."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from keyseal.ca.config import Config, parse_config
from keyseal.errors import KeysealError, UsageError
from keyseal.wrapping.local import LocalKek
from tests.harness.kube_api import KubeApi
from tests.harness.softhsm import USER_PIN, SoftHsm

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


STORE_RULES = [
    {"apiGroups": ["keyseal.dev"], "resources": ["wrappedkeys"], "verbs": ["get", "create", "update"]},
    {"apiGroups": ["keyseal.dev"], "resources": ["registrationentries"], "verbs": ["list", "watch"]},
    {"apiGroups": ["keyseal.dev"], "resources": ["jointokens"], "verbs": ["get", "delete"]},
]


def test_rbac_is_limited_to_the_crd(chart: helm_python.Chart) -> None:
    """The server's records, the entries it serves and the join tokens it redeems (tests/
    test_entries_kubernetes.py checks every call the server makes against this Role); no Secrets, no list of
    records, no writes to entries."""
    by_kind = render(chart)
    (role,) = by_kind["Role"]
    assert role["rules"] == STORE_RULES
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


PIN_RULES = [
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["keyseal-example.org-keyset-pins"],
     "verbs": ["get", "update"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
]


def test_key_manager_custody_needs_no_store_rbac(chart: helm_python.Chart) -> None:
    by_kind = render(chart, {"custody": "kms", "ca": {"keyType": "ec-p384"}})
    assert "Secret" not in by_kind
    (role,) = by_kind["Role"]  # no WrappedKey records: the agents' entries and join tokens, and the keyset pins
    assert role["rules"] == STORE_RULES[1:] + PIN_RULES
    config = server_config(by_kind)
    assert config.custody == "kms" and config.ca_key_type == "ec-p384"
    assert PIN_RULES[0]["resourceNames"] == [f"{config.record_prefix}-keyset-pins"]  # the server's name for it


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


def test_chart_crds_are_the_shipped_crds(chart: helm_python.Chart) -> None:
    shipped = sorted(p.name for p in (ROOT / "deploy" / "crds").glob("*.yaml"))
    assert shipped == ["jointokens.keyseal.dev.yaml", "registrationentries.keyseal.dev.yaml",
                       "wrappedkeys.keyseal.dev.yaml"]
    for name in shipped:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "deploy" / "crds" / name).read_bytes()
    plurals = set()
    for crd in chart.crds:
        document = yaml.safe_load(crd["data"])
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
        assert document["metadata"]["name"] == f"{document['spec']['names']['plural']}.keyseal.dev"
        plurals.add(document["spec"]["names"]["plural"])
    assert plurals == {"wrappedkeys", "registrationentries", "jointokens"}
    # The Role names only resources the chart defines (or core ConfigMaps).
    (role,) = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j"}})["Role"]
    assert {r for rule in role["rules"] if rule["apiGroups"] == ["keyseal.dev"] for r in rule["resources"]} == plurals


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


PKCS11 = {"uri": "pkcs11:token=keyseal-chart", "modulePath": "/usr/lib/softhsm/libsofthsm2.so",
          "labelPrefix": "chart/", "pinSecret": {"name": "hsm-pin", "key": "user-pin"}}
# A SoftHSM token directory and configuration brought into the pod as the vendor's client setup would be.
HSM_EXTRAS = {
    "extraVolumes": [{"name": "softhsm", "persistentVolumeClaim": {"claimName": "softhsm-tokens"}}],
    "extraVolumeMounts": [{"name": "softhsm", "mountPath": "/var/lib/softhsm"}],
    "extraEnv": [{"name": "SOFTHSM2_CONF", "value": "/var/lib/softhsm/softhsm2.conf"}],
}


def test_pkcs11_custody(chart: helm_python.Chart) -> None:
    """The server's own parser accepts the pkcs11 section the chart writes; the PIN comes from the named Secret,
    mounted read-only where pkcs11.pinFile points, and is never in the values, the ConfigMap or the environment."""
    by_kind = render(chart, {"custody": "pkcs11", "pkcs11": PKCS11, **HSM_EXTRAS})
    assert "Secret" not in by_kind  # no local KEK, and the chart never makes a PIN Secret
    config = server_config(by_kind)
    assert config.custody == "pkcs11" and config.pkcs11 is not None
    assert (config.pkcs11.uri, config.pkcs11.module_path, config.pkcs11.label_prefix) == (
        PKCS11["uri"], PKCS11["modulePath"], "chart/")
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    main = container(by_kind)
    (pin_volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "hsm-pin"]
    assert pin_volume["secret"]["items"] == [{"key": "user-pin", "path": "pin"}]
    assert pin_volume["secret"]["defaultMode"] == 0o400
    (pin_mount,) = [m for m in main["volumeMounts"] if m["name"] == pin_volume["name"]]
    assert pin_mount["readOnly"] is True and "subPath" not in pin_mount
    assert config.pkcs11.pin_file == f"{pin_mount['mountPath']}/pin"
    # The PIN reaches the server only as that file: no env var carries it, no URI attribute names it.
    assert all("valueFrom" not in e or "secretKeyRef" not in e["valueFrom"] for e in main["env"])
    config_text = by_kind["ConfigMap"][0]["data"]["config.yaml"]
    assert "pin-value" not in config_text and "pin-source" not in config_text
    # The vendor's module and client configuration come in through the extra volumes, mounts and env.
    assert HSM_EXTRAS["extraVolumes"][0] in pod["volumes"]
    assert HSM_EXTRAS["extraVolumeMounts"][0] in main["volumeMounts"]
    assert HSM_EXTRAS["extraEnv"][0] in main["env"]
    (role,) = by_kind["Role"]  # no WrappedKey records: the agents' entries and join tokens, and the keyset pins
    assert role["rules"] == STORE_RULES[1:] + PIN_RULES
    notes = chart.render({"custody": "pkcs11", "pkcs11": PKCS11}, name="trust",
                         namespace="spire")["keyseal/templates/NOTES.txt"]
    assert "Secret hsm-pin (key user-pin)" in notes and config.pkcs11.pin_file in notes


@pytest.fixture(scope="module")
def chart_token(softhsm: SoftHsm) -> str:
    return softhsm.init_token("keyseal-chart")


def test_pkcs11_config_from_the_chart_opens_a_real_token(chart: helm_python.Chart, chart_token: str,
                                                         tmp_path: Path, kube_api: KubeApi, namespace: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's rendered configuration drives a real SoftHSM2 token: the module, the token URI and the PIN
    file (here the Secret's bytes at a local path, as the kubelet writes them at pinFile) log in and read; the
    keyset pins are read from the (emulated) API server, in the pod's namespace."""
    from keyseal.backends import pkcs11 as backend
    from keyseal.ca.server import build_source

    assert PKCS11["uri"] == f"pkcs11:token={chart_token}"
    config = server_config(render(chart, {"custody": "pkcs11", "pkcs11": PKCS11}))
    assert config.pkcs11 is not None
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o400)
    local = dataclasses.replace(config, pkcs11=dataclasses.replace(config.pkcs11, pin_file=str(pin_file)))
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    try:
        build_source(local, kube_api.api_client()).startup_check()
        pin_file.chmod(0o600)
        pin_file.write_text("wrong-pin\n")
        backend.close_all_sessions()
        with pytest.raises(KeysealError, match="PIN") as refused:
            build_source(local, kube_api.api_client()).startup_check()
        assert "wrong-pin" not in str(refused.value)
    finally:
        backend.close_all_sessions()


def test_pkcs11_schema_refuses_mistakes(chart: helm_python.Chart) -> None:
    """custody pkcs11 needs the token URI, the module and the PIN Secret; the pkcs11 section with another custody,
    a KEK next to pkcs11 custody, or a URI naming keys, the module or the PIN are refused, as the server would."""
    pin = {"name": "hsm-pin"}
    for missing, values in (("uri", {"modulePath": "/m.so", "pinSecret": pin}),
                            ("modulePath", {"uri": "pkcs11:token=ca", "pinSecret": pin}),
                            ("pinSecret", {"uri": "pkcs11:token=ca", "modulePath": "/m.so"}),
                            ("pinSecret/name", {"uri": "pkcs11:token=ca", "modulePath": "/m.so",
                                                "pinSecret": {"key": "pin"}})):
        with pytest.raises(helm_python.HelmValuesError, match=missing):
            chart.render({"custody": "pkcs11", "pkcs11": values}, name="trust", namespace="spire")
    with pytest.raises(helm_python.HelmValuesError, match="pinSecret"):
        chart.render({"custody": "pkcs11"}, name="trust", namespace="spire")
    vault = {"address": "https://vault.example.org:8200", "transitKey": "keyseal-kek"}
    refused = [
        {"pkcs11": {"uri": "pkcs11:token=ca"}},  # custody wrapped
        {"custody": "kms", "pkcs11": {"pinSecret": pin}},
        {"custody": "pkcs11", "pkcs11": PKCS11, "aws": {"kmsKeyARN": ARN}},
        {"custody": "pkcs11", "pkcs11": PKCS11, "vault": vault},
        {"custody": "pkcs11", "pkcs11": PKCS11 | {"pin": "1234"}},
        {"custody": "pkcs11", "pkcs11": PKCS11 | {"labelPrefix": "bad prefix"}},
        {"custody": "pkcs11", "pkcs11": PKCS11 | {"pinSecret": {"name": "Not_A_Name"}}},
        {"custody": "pkcs11", "pkcs11": PKCS11, "extraVolumes": [{"name": "pkcs11-pin", "emptyDir": {}}]},
        *({"custody": "pkcs11", "pkcs11": PKCS11 | {"uri": uri}} for uri in (
            "token=ca", "pkcs11:token=ca;object=x509", "pkcs11:id=%01", "pkcs11:token=ca;type=private",
            "pkcs11:token=ca?module-path=/m.so", "pkcs11:token=ca?module-name=softhsm2",
            "pkcs11:token=ca?pin-value=1234", "pkcs11:token=ca?x=1&pin-source=file:/pin")),
    ]
    for values in refused:
        with pytest.raises(helm_python.HelmValuesError):
            chart.render(values, name="trust", namespace="spire")
    # The server's own parser refuses the same KEKs and URIs next to the module and PIN file the chart sets.
    server_side = {"uri": PKCS11["uri"], "modulePath": PKCS11["modulePath"], "pinFile": "/var/run/keyseal/pin"}
    for values in refused[:4] + refused[-7:]:
        pkcs11 = server_side | {k: v for k, v in values["pkcs11"].items() if k == "uri"}
        others = {"custody": "wrapped"} | {k: v for k, v in values.items() if k in ("aws", "vault", "custody")}
        with pytest.raises(UsageError):
            parse_config({"trustDomain": "example.org", **others, "pkcs11": pkcs11})


def _schema_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema node of an OpenAPI v3 schema (not the property names of a `properties` map)."""
    if not isinstance(node, dict):
        return
    yield node
    for child in node.get("properties", {}).values():
        yield from _schema_nodes(child)
    for key in ("items", "additionalProperties", "not"):
        yield from _schema_nodes(node.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for child in node.get(key, []):
            yield from _schema_nodes(child)


def test_crds_are_structural_and_identical_in_both_places(chart: helm_python.Chart) -> None:
    """A kube-apiserver refuses a CRD whose schema node has both additionalProperties and properties (they are
    mutually exclusive in a structural schema); unknown fields are pruned instead. deploy/crds and the chart's
    crds/ hold the same bytes."""
    shipped = {p.name: p for p in (ROOT / "deploy" / "crds").glob("*.yaml")}
    in_chart = {p.name: p for p in (CHART / "crds").glob("*.yaml")}
    assert shipped and sorted(shipped) == sorted(in_chart)
    loaded = {yaml.safe_load(crd["data"])["metadata"]["name"] for crd in chart.crds}
    assert loaded == {name.removesuffix(".yaml") for name in shipped}
    for name, path in shipped.items():
        assert in_chart[name].read_bytes() == path.read_bytes(), f"{name} differs between deploy/crds and the chart"
        for copy in (path, in_chart[name]):
            crd = yaml.safe_load(copy.read_text())
            for version in crd["spec"]["versions"]:
                nodes = list(_schema_nodes(version["schema"]["openAPIV3Schema"]))
                assert len(nodes) > 3
                both = [n.get("description", "?") for n in nodes if "properties" in n and "additionalProperties" in n]
                assert both == [], f"{copy}: additionalProperties next to properties in {both}"

"""The Helm chart, rendered and linted by Helm's own SDK (helm-python-sdk), its output validated against the
Kubernetes schemas (kubernetes-validate), and its server configuration read by the server's own parser."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from keyseal._internal.ca.config import Config, parse_config
from keyseal.errors import KeysealError, UsageError
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
                if str(document.get("apiVersion", "")).startswith("keyseal.dev/"):
                    validate_custom_resource(document)  # kubernetes-validate knows only Kubernetes' own kinds
                else:
                    kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def validate_custom_resource(document: dict[str, Any]) -> None:
    """A keyseal.dev resource against the openAPIV3Schema of its CRD in deploy/crds."""
    import jsonschema

    for path in (ROOT / "deploy" / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == document["kind"]:
            jsonschema.validate(document, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
            return
    raise AssertionError(f"no CRD for {document['kind']}")


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


@pytest.mark.slow
def test_default_render(chart: helm_python.Chart) -> None:
    by_kind = render(chart)
    assert sorted(by_kind) == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Role",
                               "RoleBinding", "Service", "ServiceAccount"]
    config = server_config(by_kind)
    assert config.store_type == "kubernetes" and config.kube_namespace == "spire"
    assert config.wrapping_provider == "local" and config.custody == "wrapped"
    assert "trust-keyseal.spire.svc" in config.tls.self_issued_dns
    assert config.join_token_max_ttl == timedelta(hours=1)
    assert server_config(render(chart, {"agents": {"joinTokenMaxTTL": "15m"}})).join_token_max_ttl == \
        timedelta(minutes=15)
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
    {"apiGroups": ["keyseal.dev"], "resources": ["joinedagents"], "verbs": ["get", "create", "update"]},
]


DOCUMENT_RULES = [  # the bundle sequences and the federated bundles (keyseal._internal.ca.server.build_document_store)
    {"apiGroups": [""], "resources": ["configmaps"],
     "resourceNames": ["keyseal-example.org-bundle-sequence", "keyseal-example.org-federated-bundles"],
     "verbs": ["get", "update"]},
]
CREATE_CONFIGMAPS = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]


@pytest.mark.slow
def test_rbac_is_limited_to_the_crd(chart: helm_python.Chart) -> None:
    """The server's records, the entries it serves and the join tokens it redeems (tests/
    test_entries_kubernetes.py checks every call the server makes against this Role); no Secrets, no list of
    records, no writes to entries."""
    by_kind = render(chart)
    role = server_role(by_kind)
    assert role["rules"] == STORE_RULES + DOCUMENT_RULES + CREATE_CONFIGMAPS
    (binding,) = [b for b in by_kind["RoleBinding"] if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trust-keyseal", "namespace": "spire"}]
    assert "ClusterRole" not in by_kind and "ClusterRoleBinding" not in by_kind


def server_role(by_kind: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (role,) = [r for r in by_kind["Role"] if r["metadata"]["name"] == "trust-keyseal"]
    return role


@pytest.mark.slow
def test_local_kek_comes_from_an_existing_secret(chart: helm_python.Chart) -> None:
    """The chart never makes the KEK: the pod mounts an existing Secret (by default <release>-keyseal-kek, as
    earlier chart versions named the one they generated), read-only, where the server looks for the KEK file."""
    for values, secret_name, key in (({}, "trust-keyseal-kek", "kek"),
                                     ({"localKek": {"existingSecret": "ca-kek", "key": "k"}}, "ca-kek", "k")):
        by_kind = render(chart, values)
        assert "Secret" not in by_kind
        config = server_config(by_kind)
        mount = next(m for m in container(by_kind)["volumeMounts"] if m["name"] == "kek")
        assert mount["readOnly"] is True and str(config.local_kek_file) == f"{mount['mountPath']}/kek"
        (deployment,) = by_kind["Deployment"]
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "kek")
        assert volume["secret"] == {"secretName": secret_name, "defaultMode": 0o400,
                                    "items": [{"key": key, "path": "kek"}]}
        notes = chart.render(values, name="trust", namespace="spire")["keyseal/templates/NOTES.txt"]
        assert f"kubectl -n spire create secret generic {secret_name}" in notes


KEY_MATERIAL = re.compile(r"keyseal-local-kek-v1:[A-Za-z0-9+/]{16}|keyseal-local-kek-v1:\S*=|PRIVATE KEY-----")


@pytest.mark.parametrize("values", [{}, {"agent": {"enabled": True, "joinTokenSecret": "j"}},
                                    {"keyWrapping": {"provider": "awskms"}, "aws": {"kmsKeyARN": ARN}}])
def test_rendering_twice_is_identical_and_holds_no_key_material(chart: helm_python.Chart,
                                                                values: dict[str, Any]) -> None:
    """What `helm template` (ArgoCD, Flux) renders must not change between syncs, or a sync replaces it: no
    random values, no lookups, no key material in the manifests (nor, so, in the release Secret)."""
    first = chart.render(values, name="trust", namespace="spire")
    second = chart.render(values, name="trust", namespace="spire")
    assert first == second
    text = "\n".join(first.values())
    assert KEY_MATERIAL.search(text) is None
    assert KEY_MATERIAL.search("kek: keyseal-local-kek-v1:" + base64.b64encode(bytes(32)).decode())  # it can fail
    for template in (CHART / "templates").iterdir():
        source = template.read_text()
        for function in ("randBytes", "randAlphaNum", "randAscii", "lookup", "genPrivateKey", "genCA",
                         "genSelfSignedCert", "genSignedCert", "uuidv4", "now"):
            assert f"{function} " not in source and f"({function}" not in source, f"{template.name}: {function}"


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
    role = server_role(by_kind)  # no WrappedKey records: the agents' entries and join tokens, and the keyset pins
    assert role["rules"] == STORE_RULES[1:] + PIN_RULES + DOCUMENT_RULES
    config = server_config(by_kind)
    assert config.custody == "kms" and config.ca_key_type == "ec-p384"
    assert PIN_RULES[0]["resourceNames"] == [f"{config.record_prefix}-keyset-pins"]  # the server's name for it


def test_schema_refuses_mistakes(chart: helm_python.Chart) -> None:
    for values in ({"custody": "hsm"}, {"keyWrapping": {"provider": "vault"}}, {"trustDomain": "Bad Domain"},
                   {"ca": {"keyType": "ed25519"}}, {"x509SVID": {"ttl": "one hour"}}, {"aws": {"kmsKeyArn": ARN}},
                   {"store": {"type": "directory"}},  # two replicas on a directory, and no volume
                   {"clients": [{"name": "a", "tokenSHA256": "plain-token", "allowedPathPrefixes": ["/a"]}]},
                   {"localKek": {"existingSecret": "Not_A_Secret"}}, {"localKek": {"kek": "keyseal-local-kek-v1:x"}},
                   {"agents": {"joinTokenMaxTTL": "forever"}}, {"networkPolicy": {"ingressFrom": "anyone"}},
                   {"rbac": {"joinTokenIssuers": [{"kind": "Group"}]}},
                   {"rbac": {"joinTokenIssuers": [{"kind": "Robot", "name": "r"}]}},
                   {"podDisruptionBudget": {"minAvailable": 0}}):
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


@pytest.mark.slow
def test_clients_reach_the_server_config(chart: helm_python.Chart) -> None:
    digest = "a" * 64
    by_kind = render(chart, {"clients": [{"name": "team-a", "tokenSHA256": digest,
                                          "allowedPathPrefixes": ["/ns/team-a"]}]})
    (client,) = server_config(by_kind).clients
    assert (client.name, client.token_sha256, client.prefixes) == ("team-a", digest, ("/ns/team-a",))


@pytest.mark.slow
def test_chart_crds_are_the_shipped_crds(chart: helm_python.Chart) -> None:
    shipped = sorted(p.name for p in (ROOT / "deploy" / "crds").glob("*.yaml"))
    assert shipped == ["identitytemplates.keyseal.dev.yaml", "joinedagents.keyseal.dev.yaml",
                       "jointokens.keyseal.dev.yaml",
                       "registrationentries.keyseal.dev.yaml", "wrappedkeys.keyseal.dev.yaml"]
    for name in shipped:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "deploy" / "crds" / name).read_bytes()
    plurals = set()
    for crd in chart.crds:
        document = yaml.safe_load(crd["data"])
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
        assert document["metadata"]["name"] == f"{document['spec']['names']['plural']}.keyseal.dev"
        plurals.add(document["spec"]["names"]["plural"])
    assert plurals == {"wrappedkeys", "registrationentries", "jointokens", "joinedagents", "identitytemplates"}
    # The roles name only resources the chart defines (or core ConfigMaps); the server's namespaced Role all but
    # the cluster-scoped IdentityTemplates (a ClusterRole of their own).
    manifests = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j"}})
    role = server_role(manifests)
    assert {r for rule in role["rules"] if rule["apiGroups"] == ["keyseal.dev"] for r in rule["resources"]} == \
        plurals - {"identitytemplates"}
    named = {r.split("/")[0] for each in manifests["Role"] + manifests["ClusterRole"] for rule in each["rules"]
             if rule["apiGroups"] == ["keyseal.dev"] for r in rule["resources"]}
    assert named == plurals


@pytest.mark.slow
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


@pytest.mark.slow
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
    role = server_role(by_kind)  # no WrappedKey records: the agents' entries and join tokens, and the keyset pins
    assert role["rules"] == STORE_RULES[1:] + PIN_RULES + DOCUMENT_RULES
    notes = chart.render({"custody": "pkcs11", "pkcs11": PKCS11}, name="trust",
                         namespace="spire")["keyseal/templates/NOTES.txt"]
    assert "Secret hsm-pin (key user-pin)" in notes and config.pkcs11.pin_file in notes


@pytest.fixture(scope="module")
def chart_token(softhsm: SoftHsm) -> str:
    return softhsm.init_token("keyseal-chart")


@pytest.mark.slow
def test_pkcs11_config_from_the_chart_opens_a_real_token(chart: helm_python.Chart, chart_token: str,
                                                         tmp_path: Path, kube_api: KubeApi, namespace: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's rendered configuration drives a real SoftHSM2 token: the module, the token URI and the PIN
    file (here the Secret's bytes at a local path, as the kubelet writes them at pinFile) log in and read; the
    keyset pins are read from the (emulated) API server, in the pod's namespace."""
    from keyseal._internal.ca.server import build_source
    from keyseal._internal.providers.pkcs11 import session as pkcs11_session

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
        pkcs11_session.close_all_sessions()
        with pytest.raises(KeysealError, match="PIN") as refused:
            build_source(local, kube_api.api_client()).startup_check()
        assert "wrong-pin" not in str(refused.value)
    finally:
        pkcs11_session.close_all_sessions()


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


ISSUER = {"kind": "Group", "name": "ca-admins", "apiGroup": "rbac.authorization.k8s.io"}


@pytest.mark.slow
def test_join_tokens_and_entries_have_their_own_roles(chart: helm_python.Chart) -> None:
    """Creating a JoinToken mints an agent identity, so it is a Role of its own, bound only to the subjects named
    in rbac.joinTokenIssuers (nobody by default); entries likewise (rbac.entryAdmins). The server's own Role never
    creates either."""
    by_kind = render(chart)
    roles = {r["metadata"]["name"]: r["rules"] for r in by_kind["Role"]}
    assert roles["trust-keyseal-join-token-issuer"] == [
        {"apiGroups": ["keyseal.dev"], "resources": ["jointokens"], "verbs": ["create", "list", "delete"]}]
    assert roles["trust-keyseal-entry-admin"] == [
        {"apiGroups": ["keyseal.dev"], "resources": ["registrationentries"], "verbs": ["create", "list", "delete"]}]
    # Replacing a running agent means deleting its JoinedAgent: a Role of its own, never a token issuer's.
    assert roles["trust-keyseal-agent-replacer"] == [
        {"apiGroups": ["keyseal.dev"], "resources": ["joinedagents"], "verbs": ["get", "delete"]}]
    assert all("delete" not in rule["verbs"] for rule in roles["trust-keyseal"]
               if rule["resources"] == ["joinedagents"])
    assert all("create" not in rule["verbs"] for rule in roles["trust-keyseal"] if rule["apiGroups"] == ["keyseal.dev"]
               and rule["resources"] in (["jointokens"], ["registrationentries"]))
    assert [b["roleRef"]["name"] for b in by_kind["RoleBinding"]] == ["trust-keyseal"]  # no issuer by default
    admin = {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
    bound = render(chart, {"rbac": {"joinTokenIssuers": [ISSUER], "entryAdmins": [admin]}})
    bindings = {b["roleRef"]["name"]: b["subjects"] for b in bound["RoleBinding"]}
    assert bindings["trust-keyseal-join-token-issuer"] == [ISSUER]
    assert bindings["trust-keyseal-entry-admin"] == [admin]
    directory = render(chart, {"store": {"type": "directory"}, "replicaCount": 1,
                               "persistence": {"existingClaim": "c"}})
    assert "Role" not in directory  # no custom resources: entries and tokens are files on the volume


@pytest.mark.slow
def test_server_network_policy_and_disruption_budget(chart: helm_python.Chart) -> None:
    """Ingress to the server pods only on the https port (from the sources networkPolicy.ingressFrom names, any
    by default); a PodDisruptionBudget keeps one replica through voluntary disruptions; both select the server's
    pods only, never the agents'."""
    by_kind = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j"}})
    (policy,) = by_kind["NetworkPolicy"]
    server_pods = {"app.kubernetes.io/name": "keyseal", "app.kubernetes.io/instance": "trust",
                   "app.kubernetes.io/component": "server"}
    assert policy["spec"]["podSelector"] == {"matchLabels": server_pods}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "https", "protocol": "TCP"}]}]
    (budget,) = by_kind["PodDisruptionBudget"]
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": server_pods}}
    (deployment,) = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert server_pods.items() <= labels.items()
    (daemonset,) = by_kind["DaemonSet"]
    assert daemonset["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "agent"
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    egress = [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    narrowed = render(chart, {"networkPolicy": {"ingressFrom": peers, "egress": egress}})
    (policy,) = narrowed["NetworkPolicy"]
    assert policy["spec"]["ingress"] == [{"from": peers, "ports": [{"port": "https", "protocol": "TCP"}]}]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == egress
    single = render(chart, {"replicaCount": 1, "networkPolicy": {"enabled": False}})
    assert "PodDisruptionBudget" not in single and "NetworkPolicy" not in single  # one replica: a drain must work


@pytest.mark.slow
def test_replicas_are_spread_by_default(chart: helm_python.Chart) -> None:
    """Two replicas by default, kept off one node (soft anti-affinity) and spread across zones; an explicit
    affinity replaces the default rule, and both can be turned off. The rules select the server's pods only: the
    agents' DaemonSet runs on every node, so a rule that counted its pods would keep a replica off every node."""
    by_kind = render(chart, {"agent": {"enabled": True, "joinTokenSecret": "j"}})
    (deployment,) = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    selector = {"app.kubernetes.io/name": "keyseal", "app.kubernetes.io/instance": "trust",
                "app.kubernetes.io/component": "server"}
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (daemonset,) = by_kind["DaemonSet"]
    assert not selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == selector

    (hard,) = render(chart, {"podAntiAffinity": "hard"})["Deployment"]
    (required,) = hard["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["labelSelector"]["matchLabels"] == selector
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ca"]}]}]}}}
    (custom,) = render(chart, {"affinity": own})["Deployment"]
    assert custom["spec"]["template"]["spec"]["affinity"] == own
    (bare,) = render(chart, {"podAntiAffinity": "", "topologySpreadConstraints": []})["Deployment"]
    assert "affinity" not in bare["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in bare["spec"]["template"]["spec"]
    with pytest.raises(Exception, match="podAntiAffinity"):
        render(chart, {"podAntiAffinity": "sometimes"})


def test_agent_server_urls_reach_the_agent_configuration(chart: helm_python.Chart) -> None:
    from keyseal._internal.agent.config import parse_agent_config

    values = {"agent": {"enabled": True, "joinTokenSecret": "j",
                        "serverURLs": ["https://trust-keyseal-0.example:8443", "https://trust-keyseal-1.example:8443"]}}
    maps = {m["metadata"]["name"]: m for m in render(chart, values)["ConfigMap"]}
    data = yaml.safe_load(maps["trust-keyseal-agent"]["data"]["agent.yaml"])
    config = parse_agent_config(data, {"NODE_NAME": "n1", "NODE_IP": "10.0.0.7"})  # the downward API sets both
    assert config.servers[1:] == (("trust-keyseal-0.example", 8443), ("trust-keyseal-1.example", 8443))


@pytest.mark.slow
def test_oidc_discovery_and_federation_reach_the_server_config(chart: helm_python.Chart) -> None:
    """jwtSVID.issuer, oidc.* and federation.* as the server reads them; the listeners' ports, Services, the
    optional Ingress, and their certificates mounted from Secrets."""
    by_kind = render(chart, {
        "jwtSVID": {"issuer": "https://oidc.example.org"},
        "oidc": {"enabled": True, "tls": {"existingSecret": "oidc-cert"},
                 "ingress": {"enabled": True, "host": "oidc.example.org", "className": "nginx",
                             "tlsSecretName": "public-cert"}},
        "federation": {"enabled": True, "trustDomains": [
            {"trustDomain": "partner.example", "bundleEndpointURL": "https://b.partner.example:8445/",
             "profile": "https_spiffe", "endpointSPIFFEID": "spiffe://partner.example/keyseal/server",
             "bundleFile": "/etc/keyseal/federation/partner.json"}]}})
    config = server_config(by_kind)
    assert config.jwt_issuer == "https://oidc.example.org"
    assert config.oidc is not None and (config.oidc.listen_port, str(config.oidc.cert_file)) == (
        8444, "/etc/keyseal/oidc-tls/tls.crt")
    assert config.federation.listen_port == 8445 and config.federation.cert_file is None  # https_spiffe
    (partner,) = config.federation.trust_domains
    assert (partner.trust_domain, partner.profile) == ("partner.example", "https_spiffe")
    main = container(by_kind)
    assert [p["name"] for p in main["ports"]] == ["https", "oidc", "federation"]
    (deployment,) = by_kind["Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["oidc-tls"]["secret"]["secretName"] == "oidc-cert" and "federation-tls" not in volumes
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    assert services["trust-keyseal-oidc"]["spec"]["ports"][0]["targetPort"] == "oidc"
    assert services["trust-keyseal-federation"]["spec"]["ports"][0]["targetPort"] == "federation"
    (ingress,) = by_kind["Ingress"]
    assert ingress["spec"]["rules"][0]["host"] == "oidc.example.org"
    assert ingress["spec"]["tls"] == [{"hosts": ["oidc.example.org"], "secretName": "public-cert"}]
    # https_web: the federation endpoint serves a certificate from a Secret
    web = server_config(render(chart, {"federation": {"enabled": True, "tls": {"existingSecret": "fed-web"}}}))
    assert str(web.federation.cert_file) == "/etc/keyseal/federation-tls/tls.crt"
    assert "Ingress" not in render(chart) and server_config(render(chart)).oidc is None
    (policy,) = by_kind["NetworkPolicy"]  # the public listeners are reachable from anywhere
    assert policy["spec"]["ingress"][1:] == [{"ports": [{"port": "oidc", "protocol": "TCP"}]},
                                             {"ports": [{"port": "federation", "protocol": "TCP"}]}]
    server_pods = {"app.kubernetes.io/name": "keyseal", "app.kubernetes.io/instance": "trust",
                   "app.kubernetes.io/component": "server"}
    assert services["trust-keyseal-oidc"]["spec"]["selector"] == server_pods


def test_schema_refuses_oidc_and_federation_mistakes(chart: helm_python.Chart) -> None:
    for values in ({"oidc": {"enabled": True, "tls": {"existingSecret": "c"}}},  # no jwtSVID.issuer
                   {"jwtSVID": {"issuer": "https://o.example.org"}, "oidc": {"enabled": True}},  # no certificate
                   {"jwtSVID": {"issuer": "http://o.example.org"}},
                   {"jwtSVID": {"issuer": "https://o.example.org/"}},
                   {"federation": {"trustDomains": [{"trustDomain": "b.example", "bundleEndpointURL": "https://b/"}]}},
                   {"federation": {"trustDomains": [{"trustDomain": "b.example", "bundleEndpointURL": "https://b/",
                                                     "profile": "https_web", "endpointSPIFFEIDs": "x"}]}}):
        with pytest.raises(helm_python.HelmValuesError):
            chart.render(values, name="trust", namespace="spire")


@pytest.mark.slow
def test_audit_goes_to_the_pod_log_by_default_and_a_file_needs_a_volume(chart: helm_python.Chart) -> None:
    by_kind = render(chart)
    env = {e["name"] for e in container(by_kind).get("env", [])}
    assert "KEYSEAL_AUDIT_LOG" not in env  # the server writes no file: records go to its log
    (deployment,) = by_kind["Deployment"]
    assert "audit" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for values in ({"audit": {"sink": "file"}}, {"audit": {"sink": "file", "file": {"existingClaim": ""}}},
                   {"extraEnv": [{"name": "KEYSEAL_AUDIT_LOG", "value": "/tmp/audit.log"}]}):
        with pytest.raises(helm_python.HelmValuesError):
            chart.render(values, name="trust", namespace="spire")
    by_kind = render(chart, {"audit": {"sink": "file", "file": {"existingClaim": "keyseal-audit",
                                                                 "checkpointLines": 500}}})
    (deployment,) = by_kind["Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["audit"]["persistentVolumeClaim"] == {"claimName": "keyseal-audit"}
    server = container(by_kind)
    assert {"name": "audit", "mountPath": "/var/lib/keyseal/audit"} in server["volumeMounts"]
    env_values = {e["name"]: e.get("value") for e in server["env"]}
    assert env_values["KEYSEAL_AUDIT_LOG"] == "/var/lib/keyseal/audit/$(POD_NAME).log"
    assert env_values["KEYSEAL_AUDIT_CHECKPOINT_LINES"] == "500"
    names = [e["name"] for e in server["env"]]
    assert names.index("POD_NAME") < names.index("KEYSEAL_AUDIT_LOG")  # $(POD_NAME) expands only if defined before

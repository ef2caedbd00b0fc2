"""keyseal describes workload.proto itself (keyseal._internal.agent.proto) instead of importing the `spiffe`
package's private generated modules. The description must be the same protocol as the one the `spiffe` client is
built from: every message, field number, type, label and map entry, and every method with its streaming kind."""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning
from google.protobuf import descriptor_pb2

from keyseal._internal.agent import proto


def spiffe_client_descriptor() -> descriptor_pb2.FileDescriptorProto:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        from spiffe._proto import workload_pb2  # the client's generated module: the reference, in tests only
    reference = descriptor_pb2.FileDescriptorProto()
    workload_pb2.DESCRIPTOR.CopyToProto(reference)
    return reference


def test_the_description_is_the_protocol_the_spiffe_client_speaks() -> None:
    ours, reference = proto.file_descriptor(), spiffe_client_descriptor()
    ours.ClearField("name")
    reference.ClearField("name")
    assert ours.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True), \
        f"ours:\n{ours}\nthe spiffe client's:\n{reference}"


def test_messages_round_trip_through_the_clients_classes() -> None:
    """Bytes keyseal writes parse in the client's own classes (and the claims Struct survives)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        from spiffe._proto import workload_pb2

    response = proto.message("ValidateJWTSVIDResponse", spiffe_id="spiffe://example.org/w")
    response.claims.update({"aud": ["a"], "exp": 1})
    parsed = workload_pb2.ValidateJWTSVIDResponse.FromString(response.SerializeToString())
    assert parsed.spiffe_id == "spiffe://example.org/w" and dict(parsed.claims)["exp"] == 1
    svids = proto.message("X509SVIDResponse", federated_bundles={"spiffe://b.example": b"\x30\x00"})
    assert dict(workload_pb2.X509SVIDResponse.FromString(svids.SerializeToString()).federated_bundles) == \
        {"spiffe://b.example": b"\x30\x00"}

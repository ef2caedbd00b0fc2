"""The SPIFFE Workload API's messages and service (workload.proto), described here, with no generated code.

Why not the generated modules the PyPI `spiffe` package ships: they are its private module (`spiffe._proto`),
free to move in any release, and importing them imports the whole client library. The descriptor below is
workload.proto as the SPIFFE Workload API standard publishes it (messages in no package, service
`SpiffeWorkloadAPI`); a test holds it equal, field by field, to the one the `spiffe` client is built from, and the
end-to-end tests talk to that client over the socket.

The messages live in a descriptor pool of their own: a process that also imports the `spiffe` client (a test, a
workload in the same interpreter) then has two definitions of the same names that never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

__all__ = [
    "FILE_NAME",
    "METHODS",
    "SERVICE",
    "WorkloadServicer",
    "add_servicer",
    "file_descriptor",
    "message",
]

FILE_NAME = "keyseal/workload.proto"
SERVICE = "SpiffeWorkloadAPI"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BYTES, _MESSAGE = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE
_ONE, _MANY = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# name -> fields (name, number, label, type, message type or None); a "map" field is a repeated map entry.
_MESSAGES: dict[str, list[tuple[str, int, int, int, str | None]]] = {
    "X509SVIDRequest": [],
    "X509SVIDResponse": [("svids", 1, _MANY, _MESSAGE, ".X509SVID"), ("crl", 2, _MANY, _BYTES, None),
                         ("federated_bundles", 3, _MANY, _MESSAGE, "map")],
    "X509SVID": [("spiffe_id", 1, _ONE, _STRING, None), ("x509_svid", 2, _ONE, _BYTES, None),
                 ("x509_svid_key", 3, _ONE, _BYTES, None), ("bundle", 4, _ONE, _BYTES, None),
                 ("hint", 5, _ONE, _STRING, None)],
    "X509BundlesRequest": [],
    "X509BundlesResponse": [("crl", 1, _MANY, _BYTES, None), ("bundles", 2, _MANY, _MESSAGE, "map")],
    "JWTSVIDRequest": [("audience", 1, _MANY, _STRING, None), ("spiffe_id", 2, _ONE, _STRING, None)],
    "JWTSVIDResponse": [("svids", 1, _MANY, _MESSAGE, ".JWTSVID")],
    "JWTSVID": [("spiffe_id", 1, _ONE, _STRING, None), ("svid", 2, _ONE, _STRING, None),
                ("hint", 3, _ONE, _STRING, None)],
    "JWTBundlesRequest": [],
    "JWTBundlesResponse": [("bundles", 1, _MANY, _MESSAGE, "map")],
    "ValidateJWTSVIDRequest": [("audience", 1, _ONE, _STRING, None), ("svid", 2, _ONE, _STRING, None)],
    "ValidateJWTSVIDResponse": [("spiffe_id", 1, _ONE, _STRING, None),
                                ("claims", 2, _ONE, _MESSAGE, ".google.protobuf.Struct")],
}

# method -> (request, response, server streaming)
METHODS: dict[str, tuple[str, str, bool]] = {
    "FetchX509SVID": ("X509SVIDRequest", "X509SVIDResponse", True),
    "FetchX509Bundles": ("X509BundlesRequest", "X509BundlesResponse", True),
    "FetchJWTSVID": ("JWTSVIDRequest", "JWTSVIDResponse", False),
    "FetchJWTBundles": ("JWTBundlesRequest", "JWTBundlesResponse", True),
    "ValidateJWTSVID": ("ValidateJWTSVIDRequest", "ValidateJWTSVIDResponse", False),
}


def _entry_name(field: str) -> str:
    """protoc's name for a map field's entry type: federated_bundles -> FederatedBundlesEntry."""
    return "".join(part.capitalize() for part in field.split("_")) + "Entry"


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """workload.proto as a FileDescriptorProto (what protoc would have produced from the .proto file)."""
    proto = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, syntax="proto3",
                                               dependency=["google/protobuf/struct.proto"])
    for name, fields in _MESSAGES.items():
        message_type = proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            field = message_type.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name == "map":
                entry = message_type.nested_type.add(name=_entry_name(field_name))
                entry.field.add(name="key", number=1, label=_ONE, type=_STRING)
                entry.field.add(name="value", number=2, label=_ONE, type=_BYTES)
                entry.options.map_entry = True
                field.type_name = f".{name}.{entry.name}"
            elif type_name is not None:
                field.type_name = type_name
    service = proto.service.add(name=SERVICE)
    for method, (request, response, streaming) in METHODS.items():
        added = service.method.add(name=method, input_type=f".{request}", output_type=f".{response}")
        if streaming:  # unset, not false, for a unary call: as protoc writes it
            added.server_streaming = True
    return proto


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    pool.Add(file_descriptor())
    return pool


_POOL = _build_pool()
_CLASSES: dict[str, Any] = {name: message_factory.GetMessageClass(_POOL.FindMessageTypeByName(name))
                            for name in _MESSAGES}


def message(name: str, **fields: Any) -> Any:
    """A new message of workload.proto by its name, e.g. message("JWTSVID", spiffe_id=..., svid=...)."""
    return _CLASSES[name](**fields)


class WorkloadServicer:
    """The service's methods, each as gRPC calls it: (request, context) -> a response, or an iterator of them."""

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise NotImplementedError

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise NotImplementedError

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise NotImplementedError

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        raise NotImplementedError

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise NotImplementedError


def add_servicer(servicer: WorkloadServicer, server: grpc.Server) -> None:
    """Serve `servicer` as /SpiffeWorkloadAPI/<method> on `server`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method, (request, response, streaming) in METHODS.items():
        behaviour: Callable[..., Any] = getattr(servicer, method)
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[method] = make(behaviour, request_deserializer=_CLASSES[request].FromString,
                                response_serializer=_CLASSES[response].SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

"""The Workload API's generated messages and stubs, the ones the PyPI `spiffe` package ships.

Importing `spiffe` names `cryptography`'s DSA types, which current `cryptography` releases deprecate with a
warning at import. That warning is about the dependency, not about anything keyseal or its user did, so it is
silenced here, for that import only, by category and by the module that triggers it; every other warning is left
as it is."""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"spiffe(\.|$)")
    from spiffe._proto import workload_pb2, workload_pb2_grpc

__all__ = ["workload_pb2", "workload_pb2_grpc"]

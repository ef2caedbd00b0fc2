"""The node agent (`keyseal agent`): joins the trust-domain server, caches the SVIDs of the registration entries
it holds, and serves them to local workloads over the SPIFFE Workload API on a Unix socket (docs/agent.md).

Importing this package imports no gRPC: `keyseal._internal.agent.workload` does, and it needs `keyseal[agent]`."""

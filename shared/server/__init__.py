"""gRPC server plumbing both services share: building and running a server, error mapping, auth, metrics, logs."""

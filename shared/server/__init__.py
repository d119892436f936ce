"""gRPC server plumbing both services share: building (`builder`), running and stopping (`lifecycle`), start-up
checks (`startup`), error mapping (`status`), the interceptor (`interceptors`) with `auth` and `metrics`, and `logs`."""

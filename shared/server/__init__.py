"""gRPC server plumbing both services share: building and running asyncio servers (`builder`), stopping them
(`lifecycle`), start-up checks (`startup`), error mapping (`status`), the cap on open streams (`limits`), the
interceptor (`interceptors`) with `auth` and `metrics`, and `logs`."""

"""layrot.server: the collector daemon (gRPC ingest and queries, history, metrics, alerts, control)."""

"""The RPC kit: server bootstrap, request path, errors, metrics, tracing, logs."""

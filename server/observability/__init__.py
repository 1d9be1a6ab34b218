"""What operators see: Prometheus metrics, the log output, and one access line per request."""

"""evit.latency."""

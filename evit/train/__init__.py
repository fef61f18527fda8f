"""evit.train."""

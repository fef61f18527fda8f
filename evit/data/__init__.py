"""evit.data."""

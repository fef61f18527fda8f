"""evit.search."""

"""evit.export."""

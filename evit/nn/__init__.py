"""evit.nn."""

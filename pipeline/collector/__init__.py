"""The front door for channel systems: an HTTP collector, the browser snippet it serves and webhook mappings."""

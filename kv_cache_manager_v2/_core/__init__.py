"""The manager and cache objects, and page-index conversion."""

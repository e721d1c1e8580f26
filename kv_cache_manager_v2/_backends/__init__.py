"""Memory backends: where pool bytes live and how they are copied."""

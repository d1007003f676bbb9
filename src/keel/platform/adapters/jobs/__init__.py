"""Job queue adapters: RQ for production, an in-process runner for the embedded default."""

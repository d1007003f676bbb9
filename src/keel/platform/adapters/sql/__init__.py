"""SQL plumbing shared by every context's SQL adapters (SQLAlchemy 2 async, advanced-alchemy types)."""

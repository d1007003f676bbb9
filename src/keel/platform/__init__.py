"""Cross-cutting capabilities shared by every bounded context (errors, ids, paging, clock, health)."""

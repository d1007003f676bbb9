"""Keel: a multi-tenant SaaS API backbone built from hexagonal bounded contexts."""

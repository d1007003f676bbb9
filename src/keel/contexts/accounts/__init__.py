"""Accounts: tenants, their users (profiles), API keys and tenant configuration."""

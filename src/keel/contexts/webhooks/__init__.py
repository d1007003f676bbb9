"""Outbound webhooks: endpoints tenants register, and signed, retried deliveries of their events."""

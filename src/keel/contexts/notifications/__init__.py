"""Notifications: emails sent from jobs that react to events."""

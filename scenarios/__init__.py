"""Bundled scenarios, reachable by name from the installed ``twin`` command."""

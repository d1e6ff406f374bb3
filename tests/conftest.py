"""Shared fixtures: real peers live in tests/peers/ and are loaded as plugins."""

pytest_plugins = ["tests.peers.oidc"]

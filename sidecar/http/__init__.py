"""The foundation layer: request targets, header hygiene, TLS contexts. Imports no stage."""

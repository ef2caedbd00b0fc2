"""Vault / OpenBao: connection settings and client, error translation, Transit key references, policies."""

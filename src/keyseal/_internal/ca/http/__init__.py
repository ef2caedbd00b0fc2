"""The server's HTTPS API (docs/server-api.md): one-thread TLS listener, HTTP/1.1 framing, routes for clients and
node agents, authentication, metrics and the serving certificate.
"""

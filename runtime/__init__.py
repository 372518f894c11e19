"""The bundled runtime: what a deployment team installs to serve artifacts (no training stack)."""

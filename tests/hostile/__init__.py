"""Hostile input ring: malicious layer tars and malformed requests over the real socket."""

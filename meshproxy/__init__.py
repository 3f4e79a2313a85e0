"""meshproxy: the data plane (HTTP/1.1 + TCP proxy)."""

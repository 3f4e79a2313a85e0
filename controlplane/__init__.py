"""meshproxy control plane: config API, registry, push, meshctl."""

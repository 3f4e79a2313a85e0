"""SPIFFE ids: defined in :mod:`meshproxy.config.identity` (part of the config contract the
control plane shares); re-exported here for the data plane's security modules."""
from ..config.identity import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, SpiffeId, identity_errors

__all__ = ["DEFAULT_TRUST_DOMAIN", "InvalidSpiffeId", "SpiffeId", "identity_errors"]

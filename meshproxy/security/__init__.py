"""Security of the data plane: workload identity and certificates, peer authentication
(mTLS) and authorization policy."""

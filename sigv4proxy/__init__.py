"""sigv4proxy: a SigV4 signing sidecar proxy for Amazon VPC Lattice."""

__version__ = "0.1.0"

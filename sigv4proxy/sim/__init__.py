"""A local VPC Lattice simulator: SigV4 verification, identities and auth-policy evaluation.

Independent of the proxy's signer on purpose: it is the oracle the proxy is tested against, so
it never imports `sigv4proxy.signing`.
"""

"""A local VPC Lattice simulator: SigV4 verification, identities and auth-policy evaluation.

Independent of the proxy's signer on purpose: it is the oracle the proxy is tested against, so
it never imports `sigv4proxy.signing`.
"""

DEFAULT_SERVICE_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"
DEFAULT_NETWORK_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:servicenetwork/sn-0123456789abcdef0"

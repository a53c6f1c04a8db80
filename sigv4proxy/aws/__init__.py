"""The AWS domain: SigV4 and SigV4A signing, routing to targets, credentials (botocore only in
credential_sources).
"""

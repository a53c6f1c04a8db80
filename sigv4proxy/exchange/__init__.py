"""The protocol-independent request path: admission, prepare (route, credentials, sign), the pool, the
relay through an inbound responder, one error path, one observation.
"""

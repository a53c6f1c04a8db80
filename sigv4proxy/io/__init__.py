"""Socket-level I/O below the protocols: splice(2) body moves, reads straight off a socket, the
original destination of a redirected connection.
"""

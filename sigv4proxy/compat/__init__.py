"""Every use of a third-party library's private API, one module per library: `aiohttp` (the
inbound HTTP/1.1 protocol; `aiohttp_import` for how a serving process first imports it),
`botocore` (awscrt kept out, the refresh schedule of fetched credentials), `h2` (state machine
after GOAWAY, HPACK slots, request errors kept to their stream), `hpack` (static table, Huffman
decoder), `hyperframe` (frame reprs), `prometheus_client` (batched histogram writes).

Each module refuses to load with a release outside the range it was written and tested against
(`versions`), and `sigv4proxy` checks them all at start without importing them. A leaf layer:
every layer may import it; it imports nothing of ours outside this package.
"""

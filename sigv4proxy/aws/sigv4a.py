"""SigV4A (`AWS4-ECDSA-P256-SHA256`): multi-region signing with an ECDSA P-256 key.

Owns: the SigV4A key derivation (the counter-mode HMAC-SHA256 KDF over "AWS4A" + secret, as
aws-c-auth defines it), the per-credentials key cache, the region-set header and the
region-less credential scope. Canonicalisation is SigV4's, inherited from `signing.SigV4Signer`.

Must never: read a clock, do I/O, or expose the private key, the secret or a signature in a repr,
log or exception message. ECDSA signatures are randomised: two signatures of one request differ,
and both verify.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sigv4proxy.aws.signing import Credentials, SigV4Signer

ALGORITHM_V4A = "AWS4-ECDSA-P256-SHA256"
# Order of the P-256 group.
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_KDF_LABEL = ALGORITHM_V4A.encode()
_KEY_CACHE_SIZE = 8
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def derive_ecdsa_key(access_key: str, secret_key: str) -> ec.EllipticCurvePrivateKey:
    """The SigV4A private key of a credential pair (NIST SP 800-108 counter-mode KDF).

    For counter = 1..254: k0 = HMAC-SHA256("AWS4A" + secret, be32(1) || label || 0x00 ||
    access_key || counter || be32(256)); the first k0 with k0 <= n - 2 gives d = k0 + 1.
    """
    kdf_key = ("AWS4A" + secret_key).encode()
    prefix = b"\x00\x00\x00\x01" + _KDF_LABEL + b"\x00" + access_key.encode()
    for counter in range(1, 255):
        k0 = hmac.digest(kdf_key, prefix + bytes([counter]) + b"\x00\x00\x01\x00", "sha256")
        candidate = int.from_bytes(k0, "big")
        if candidate <= _P256_N - 2:
            return ec.derive_private_key(candidate + 1, ec.SECP256R1())
    # Probability ~2^-8000: reaching here means broken inputs, not bad luck.
    raise ValueError("SigV4A key derivation did not converge")


class SigV4ASigner(SigV4Signer):
    """Same interface as `SigV4Signer`; signs for a region set ("*" = any region)."""

    algorithm = ALGORITHM_V4A

    def __init__(
        self,
        service: str,
        region_set: str = "*",
        *,
        extra_signed_headers: Iterable[str] = (),
        unsigned_payload: bool | None = None,
        normalize_path: bool = True,
        double_encode_path: bool = True,
        content_sha256_header: bool = True,
    ) -> None:
        if not region_set or any(c.isspace() for c in region_set):
            raise ValueError("region_set must be non-empty, e.g. '*' or 'us-east-1,us-west-2'")
        self.region_set = region_set
        self._ecdsa_keys: dict[tuple[str, str], ec.EllipticCurvePrivateKey] = {}
        super().__init__(
            service,
            region_set,
            extra_signed_headers=extra_signed_headers,
            unsigned_payload=unsigned_payload,
            normalize_path=normalize_path,
            double_encode_path=double_encode_path,
            content_sha256_header=content_sha256_header,
        )

    def __repr__(self) -> str:
        return f"SigV4ASigner(service={self.service!r}, region_set={self.region_set!r})"

    def _scope_suffix(self) -> str:
        return f"/{self.service}/aws4_request"  # no region: the region set is a signed header

    def _own_header_names(self) -> frozenset[str]:
        return frozenset({"x-amz-region-set"})

    def _extra_own_headers(self) -> list[tuple[str, str]]:
        return [("x-amz-region-set", self.region_set)]

    def _derive_key(self, creds: Credentials, datestamp: str) -> object:
        # The key does not depend on the date: derive once per credentials (the KDF and the
        # scalar multiplication are costly: docs/performance.md), reuse across days.
        cache_key = (creds.access_key, creds.secret_key)
        key = self._ecdsa_keys.get(cache_key)
        if key is None:
            key = derive_ecdsa_key(creds.access_key, creds.secret_key)
            if len(self._ecdsa_keys) >= _KEY_CACHE_SIZE:
                del self._ecdsa_keys[next(iter(self._ecdsa_keys))]
            self._ecdsa_keys[cache_key] = key
        return key

    def _signature(self, key: object, string_to_sign: bytes) -> str:
        # DER-encoded ECDSA signature of SHA-256(string to sign), hex, as aws-c-auth sends it.
        return key.sign(string_to_sign, _ECDSA_SHA256).hex()  # type: ignore[attr-defined]

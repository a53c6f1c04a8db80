"""SigV4A verification for the simulator (`AWS4-ECDSA-P256-SHA256`), written from the spec.

Owns: the simulator's side of SigV4A: deriving an identity's P-256 public key from its secret
(the NIST SP 800-108 counter-mode HMAC-SHA256 KDF over "AWS4A" + secret, as aws-c-auth defines
it), parsing the region-less Authorization header, checking that the signed `X-Amz-Region-Set`
covers the simulator's region, and verifying the DER ECDSA signature with `cryptography`.
Canonicalisation is the simulator's own (`sim.verify`), shared with its SigV4 verifier.

Must never: import `sigv4proxy.aws.sigv4a` or `sigv4proxy.aws.signing` (this is the independent oracle
the proxy's signer is tested against), read the clock (callers pass `now`), or put a secret, a
session token, a private key or a signature in an error message or a repr.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sigv4proxy.sim.verify import (
    MISMATCH,
    SIGV4A_ALGORITHM,
    UNSIGNED_PAYLOAD,
    RequestView,
    Verified,
    VerifyContext,
    canonical_request,
    check_date_and_host,
    check_scope,
    check_time_payload_and_key,
    header_value,
    incomplete,
    invalid,
)

REGION_SET_HEADER = "x-amz-region-set"
# n, the order of the NIST P-256 base point (FIPS 186-4, D.1.2.3).
P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)
# DER ECDSA-P256 signatures are 8..72 bytes; anything else cannot be one.
_SIGNATURE_HEX = re.compile(r"^(?:[0-9a-f]{2}){8,72}$")
_REGION_PATTERN = re.compile(r"^[a-z0-9*-]+$")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class V4AAuthorization:
    """A parsed SigV4A Authorization header: the scope has no region (the region set is signed)."""

    access_key_id: str
    date: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signed_headers_raw: str
    signature: str

    algorithm = SIGV4A_ALGORITHM

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.service}/{self.terminator}"

    def __repr__(self) -> str:  # the signature never shows up in a repr
        return f"V4AAuthorization(key={self.access_key_id}, scope={self.scope})"


# --- key derivation (pure) ---


def _kdf_input(access_key_id: str, counter: int) -> bytes:
    # SP 800-108 fixed input: i (32-bit, always 1: one 256-bit block) || Label || 0x00 ||
    # Context (access key id || the external counter byte) || L (32-bit, 256 bits wanted).
    return b"".join(
        (
            (1).to_bytes(4, "big"),
            SIGV4A_ALGORITHM.encode("ascii"),
            b"\x00",
            access_key_id.encode("utf-8"),
            counter.to_bytes(1, "big"),
            (256).to_bytes(4, "big"),
        )
    )


def private_scalar(access_key_id: str, secret_access_key: str) -> int:
    """The SigV4A private scalar d of a credential pair (1 <= d <= n - 1).

    Tries counters 1..254; a candidate c is kept when c <= n - 2, giving d = c + 1 (rejection
    sampling keeps d uniform in [1, n-1]).
    """
    kdf_key = b"AWS4A" + secret_access_key.encode("utf-8")
    for counter in range(1, 255):
        block = hmac.new(kdf_key, _kdf_input(access_key_id, counter), hashlib.sha256).digest()
        candidate = int.from_bytes(block, "big")
        if candidate <= P256_ORDER - 2:
            return candidate + 1
    raise ValueError("SigV4A key derivation found no valid scalar")  # ~2^-8000: broken input


@lru_cache(maxsize=64)
def public_key_for(access_key_id: str, secret_access_key: str) -> ec.EllipticCurvePublicKey:
    """The identity's SigV4A public key (cached: the scalar multiplication is costly)."""
    scalar = private_scalar(access_key_id, secret_access_key)
    return ec.derive_private_key(scalar, ec.SECP256R1()).public_key()


# --- string to sign and signature (pure) ---


def string_to_sign_v4a(amz_date: str, scope: str, creq: str) -> str:
    digest = hashlib.sha256(creq.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{SIGV4A_ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signature_matches(public_key: ec.EllipticCurvePublicKey, signature_hex: str, sts: str) -> bool:
    """True when `signature_hex` (hex of a DER ECDSA signature) signs SHA-256(`sts`)."""
    try:
        public_key.verify(bytes.fromhex(signature_hex), sts.encode("utf-8"), _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


def region_set_covers(region_set: str, region: str) -> bool:
    """`region_set` is a comma list of region names, each may use '*' (e.g. `*`, `us-*`)."""
    entries = [e.strip() for e in region_set.split(",")]
    if not entries or not all(e and _REGION_PATTERN.match(e) for e in entries):
        return False
    return any(fnmatch.fnmatchcase(region, entry) for entry in entries)


# --- the Authorization header ---


def parse_authorization_v4a(value: str) -> V4AAuthorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != SIGV4A_ALGORITHM:
        raise incomplete(f"Unsupported AWS 'algorithm'; expected {SIGV4A_ALGORITHM}.")
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, val = part.strip().partition("=")
        if eq:
            params[key] = val
    # Each parameter is checked as soon as it is known present: a SigV4 credential (5 parts)
    # sent with the SigV4A algorithm name gets the message that explains the mix-up.
    if "Credential" not in params:
        raise incomplete("Authorization header requires 'Credential' parameter.")
    cred = params["Credential"].split("/")
    if len(cred) != 4 or not all(cred):
        raise incomplete(
            "Credential must have exactly 4 slash-delimited elements for SigV4A "
            "(AWS4-ECDSA-P256-SHA256), e.g. keyid/date/service/term."
        )
    for required in ("SignedHeaders", "Signature"):
        if required not in params:
            raise incomplete(f"Authorization header requires '{required}' parameter.")
    signed = params["SignedHeaders"]
    names = tuple(signed.split(";"))
    if not all(names) or any(n != n.lower() for n in names):
        raise incomplete("SignedHeaders must be a ';'-separated list of lowercase header names.")
    if not _SIGNATURE_HEX.match(params["Signature"]):
        raise incomplete("Signature must be the lowercase hex of a DER-encoded ECDSA signature.")
    return V4AAuthorization(cred[0], cred[1], cred[2], cred[3], names, signed, params["Signature"])


# --- verification ---


def verify_sigv4a(req: RequestView, auth_value: str, ctx: VerifyContext) -> Verified:
    """Verify a SigV4A-signed request; raises AuthFailure with the Lattice exception name."""
    auth = parse_authorization_v4a(auth_value)
    amz_date = check_date_and_host(req, auth)
    if REGION_SET_HEADER not in auth.signed_headers:
        raise incomplete("'X-Amz-Region-Set' must be a 'SignedHeader' for AWS4-ECDSA-P256-SHA256.")
    check_scope(auth, amz_date, ctx)
    region_set = header_value(req.headers, REGION_SET_HEADER)
    if region_set is None:
        raise incomplete("'x-amz-region-set' is named as a SignedHeader, but it does not exist in the HTTP request.")
    if not region_set_covers(region_set, ctx.region):
        raise invalid(f"X-Amz-Region-Set should include the region '{ctx.region}', not '{region_set[:100]}'.")
    identity = check_time_payload_and_key(req, ctx, amz_date, auth.access_key_id)
    creq = canonical_request(
        req, auth.signed_headers, auth.signed_headers_raw, UNSIGNED_PAYLOAD, ctx.double_encode_path
    )
    sts = string_to_sign_v4a(amz_date, auth.scope, creq)
    public_key = public_key_for(identity.access_key_id, identity.secret_access_key)
    if not signature_matches(public_key, auth.signature, sts):
        raise invalid(MISMATCH)
    return Verified(identity, auth)

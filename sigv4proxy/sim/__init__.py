"""A local VPC Lattice simulator: SigV4 verification, identities and auth-policy evaluation.

Independent of the proxy's signer on purpose: it is the oracle the proxy is tested against, so
it never imports `sigv4proxy.aws.signing`.
"""

import os

DEFAULT_SERVICE_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:service/svc-0123456789abcdef0"
DEFAULT_NETWORK_ARN = "arn:aws:vpc-lattice:us-west-2:111122223333:servicenetwork/sn-0123456789abcdef0"
# How the canonical URI is built: the path encoded once more (the SigV4 rule) or as it arrived.
URI_PATH_ESCAPINGS = ("double", "single")


def read_json_file(path: "str | os.PathLike[str]", kind: str, error: type[Exception]) -> object:
    """A JSON document from a file; `error(...)` names the file and the problem (no contents)."""
    import json
    import pathlib

    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {kind} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{kind} file {path} is not valid JSON (line {exc.lineno})") from None

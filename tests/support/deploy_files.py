"""Reading the deployment files as data: the Dockerfile's instructions (continuations joined,
comments dropped, stages counted) and the ports, uid and flags every manifest must agree on."""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
PROXY_PORT, ADMIN_PORT, PROXY_UID = 8080, 9901, 101


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def dockerfile() -> list[Instruction]:
    """Instructions with continuations joined and comments dropped; stage counts FROMs (-1 before)."""
    logical, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    out, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def stages() -> list[list[Instruction]]:
    instructions = dockerfile()
    count = max(i.stage for i in instructions) + 1
    return [[i for i in instructions if i.stage == n] for n in range(count)]


def base_images() -> list[str]:
    args = {}
    for inst in dockerfile():
        if inst.keyword == "ARG" and inst.stage == -1 and "=" in inst.args:
            name, _, value = inst.args.partition("=")
            args[name] = value
    images = []
    for inst in dockerfile():
        if inst.keyword == "FROM":
            image = inst.args.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def final(keyword: str) -> list[Instruction]:
    return [i for i in stages()[-1] if i.keyword == keyword]


def healthcheck_argv() -> list[str]:
    (check,) = final("HEALTHCHECK")
    _, _, command = check.args.partition("CMD ")
    return exec_form(command)


def hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def listens(argv: list[str]) -> list[tuple[str, int]]:
    """Every `--listen HOST:PORT` in argv, in order."""
    return [hostport(value) for name, value in zip(argv, argv[1:]) if name == "--listen"]


def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    if name in argv:
        return argv[argv.index(name) + 1]
    return default


def flags(argv: list[str], name: str) -> list[str]:
    """Every value of a repeatable flag (`--listen A --listen B`), in order."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]

"""`dejavu-keys`: the CurveZMQ keys of a deployment's users, made once and copied to the machines that need them.

`dejavu-keys generate DIR` writes four keypairs in bus/security.py's format (DIR/public.json, the public keys of
all; DIR/<name>.key_secret, one secret key each; 0600 files in a 0700 directory): `server` (the controller's client
socket), `agent` (host agents), `client` (applications) and `admin` (operators: the client key's rights, plus
pids, addresses and the model path in status). `dejavu-keys show DIR` lists the public keys and which secret keys
the directory holds. Runs on the user's machine, before any deployment; it never overwrites a key unless asked
(`--force`): a replaced key locks out every machine still holding the old one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bus.security import ADMIN, AGENT, CLIENT, PUBLIC_TABLE, SERVER, USER_KEYS, generate


def secret_file(name: str) -> str:
    return f"{name}.key_secret"


WHERE = (  # which machine needs which files, and what reads them there
    ("the server machine (dejavu-serve --keys DIR)", (SERVER, AGENT)),
    ("each agent machine (dejavu-agent --keys DIR)", (AGENT,)),
    ("each client (dejavu-client --keys DIR; AsyncClient(address, keys=DIR))", (CLIENT,)),
    ("each administrator (dejavu-client --keys DIR --key-name admin)", (ADMIN,)),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-keys", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help=f"write the {', '.join(USER_KEYS)} keypairs into DIR")
    g.add_argument("dir", metavar="DIR", type=Path)
    g.add_argument("--force", action="store_true", help="replace keys DIR holds already")
    s = sub.add_parser("show", help="list DIR's public keys and the secret keys it holds")
    s.add_argument("dir", metavar="DIR", type=Path)
    return p


def cmd_generate(d: Path, force: bool) -> int:
    existing = [f for f in (PUBLIC_TABLE, *map(secret_file, USER_KEYS)) if (d / f).exists()]
    if existing and not force:
        print(f"dejavu-keys: error: {d} already holds {', '.join(existing)}; a new key locks out every machine "
              "holding the old one: use another DIR, or --force to replace them", file=sys.stderr)
        return 2
    for f in existing:  # --force: start over (generate() keeps the names it finds in the table)
        (d / f).unlink()
    generate(d, list(USER_KEYS))
    print(f"dejavu-keys: wrote the keypairs {', '.join(USER_KEYS)} into {d}. Copy to")
    for who, names in WHERE:
        print(f"  {who}: {' '.join(map(secret_file, names))} {PUBLIC_TABLE}")
    print("into a directory only its user can read (mode 0700, files 0600). A secret key goes nowhere else.")
    return 0


def cmd_show(d: Path) -> int:
    try:
        table = json.loads((d / PUBLIC_TABLE).read_text())
    except (OSError, ValueError) as e:
        print(f"dejavu-keys: error: {d / PUBLIC_TABLE}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    for name, public in table.items():
        held = "secret key here" if (d / secret_file(name)).is_file() else "public key only"
        print(f"{name:8} {public}  ({held})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return cmd_generate(args.dir, args.force) if args.command == "generate" else cmd_show(args.dir)
    except OSError as e:
        print(f"dejavu-keys: error: {e.filename or args.dir}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""containerd's shim command line (Go flag syntax), parsed without argparse."""

from __future__ import annotations


class Flags:
    """The flags containerd passes (Go flag syntax: -name value or -name=value)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = ""
        self.bundle = ""
        self.debug = False
        self.version = False
        self.info = False
        self.action = ""


def parse_flags(argv: list[str]) -> Flags:
    """Parse containerd's shim command line; unknown flags are an error."""
    f = Flags()
    names = {
        "namespace", "id", "address", "publish-binary", "bundle", "socket", "debug", "v", "info"
    }  # fmt: skip
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            if f.action:
                raise SystemExit(f"unexpected argument {arg!r}")
            f.action = arg
            i += 1
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name not in names:
            raise SystemExit(f"flag provided but not defined: -{name}")
        if name in ("debug", "v", "info"):
            on = value.lower() not in ("false", "0") if eq else True
            setattr(f, {"v": "version"}.get(name, name), on)
            i += 1
            continue
        if not eq:
            i += 1
            if i >= len(argv):
                raise SystemExit(f"flag needs an argument: -{name}")
            value = argv[i]
        if name != "socket":
            setattr(f, name.replace("-", "_"), value)
        i += 1
    return f

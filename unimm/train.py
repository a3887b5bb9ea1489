"""``python -m unimm.train RECIPE.yaml [key=value ...]``: the same as ``unimm train`` (for launchers)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from unimm import cli


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

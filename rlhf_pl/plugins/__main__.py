"""``python -m rlhf_pl.plugins``: the installed plugins of every kind and the packages providing them."""
from __future__ import annotations

import sys

from rlhf_pl.registry import KINDS, PluginError, installed


def plugin_rows() -> list[tuple[str, str, str, str]]:
    """(config group, name, providing package, description) for every installed plugin."""
    rows = []
    for kind, group in KINDS.items():
        for plugin in installed(kind):
            try:
                description = plugin.spec().description
            except PluginError as err:
                description = f"BROKEN: {err}"
            rows.append((group, plugin.name, plugin.distribution, description))
    return rows


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rlhf_pl plugins (select with <group>=<name>)")
    for column in ("group", "name", "package", "description"):
        table.add_column(column)
    rows = plugin_rows()
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    return 1 if any(r[3].startswith("BROKEN") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Results as rich tables (stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["print_table", "stdout"]

stdout = Console()


def print_table(table, title: str | None = None, limit: int | None = None) -> None:
    """Print a calibration table: tap, source module type, min, max, amax, scale, method."""
    t = Table(title=title, show_lines=False)
    for col, kw in [("#", {"justify": "right"}), ("tap", {}), ("module", {}), ("min", {"justify": "right"}),
                    ("max", {"justify": "right"}), ("amax", {"justify": "right"}), ("scale", {"justify": "right"}),
                    ("method", {})]:
        t.add_column(col, **kw)
    items = list(table.items())
    shown = items if limit is None else items[:limit]
    for i, (name, r) in enumerate(shown):
        info = table.infos.get(name)
        t.add_row(str(i), name, info.module_type if info else "", f"{r.min:.4g}", f"{r.max:.4g}",
                  f"{r.amax:.5g}", f"{r.scale:.5g}", r.method)
    if len(shown) < len(items):
        t.add_row("…", f"{len(items) - len(shown)} more", "", "", "", "", "", "")
    stdout.print(t)

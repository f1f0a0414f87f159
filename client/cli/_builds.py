"""``plait builds …``: the images and virtualenvs made for environments; why one was (not)
reused.

Everything here works over the API (BuildService), so it works the same against a remote
server: the comparison of two builds' key material (``explain KEY OTHER``) is done here, on the
two JSON documents, not by the engine.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from plait.cli._common import EPILOG, fail, get_console, output_option, print_json, time_json
from plait.errors import PlaitError

if TYPE_CHECKING:
    from plait._client import Client
    from plait._models import BuildInfo

DEFAULT_UNUSED_FOR = "7d"
"""What ``plait builds prune`` without KEY removes: builds unused for this long."""
MAX_KEYS = 1000
"""The most keys one PruneBuilds request may name (the server's limit)."""

_STATUS_COLOUR = {"READY": "green", "FAILED": "red", "BUILDING": "blue"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (a number alone: seconds).

    Raises:
        ValueError: not a duration.
    """
    m = _DURATION.match(text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 12h, 7d, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A click callback: a duration option's value in seconds (None when not given)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def size_text(n: int) -> str:
    """Bytes as people read them: ``0 B``, ``12.0 KiB``, ``340.2 MiB``, ``1.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(seconds: float) -> str:
    """A span as its largest unit: ``40s``, ``12m``, ``5h``, ``3d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _when(t: float, now: float) -> str:
    if not t:
        return "-"
    local = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    return f"{local} ({age_text(now - t)} ago)"


def _client() -> Client:
    from plait._client import Client

    return Client.default()


def _get(client: Client, key: str) -> BuildInfo:
    try:
        return client.get_build(key)
    except PlaitError as exc:
        fail(str(exc))


# ---- key material: shown, and compared ----


def _value(v: Any) -> str:
    """A material value on one line: strings as they are, the rest as JSON."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def material_lines(material: dict[str, Any]) -> list[str]:
    """Key material, component by component: lists and mappings one item a line."""
    out = []
    for name in sorted(material):
        v = material[name]
        if isinstance(v, list):
            out.append(f"{name}:" + ("" if v else " (none)"))
            out.extend(f"  - {_value(item)}" for item in v)
        elif isinstance(v, dict):
            out.append(f"{name}:" + ("" if v else " (none)"))
            out.extend(f"  {k}: {_value(item)}" for k, item in sorted(v.items()))
        else:
            out.append(f"{name}: {_value(v)}")
    return out


def diff_material(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """How two builds' key material differs: for each top-level component that differs, its
    lines (the first names it). Lists show the items added (``+``) and removed (``-``) from
    ``a`` to ``b``, mappings their entries added, removed and changed (``~``), anything else
    both values (``a → b``).

    This is the comparison ``plait builds explain KEY OTHER`` prints; it reads only the two
    JSON documents, so the CLI needs no engine for it.
    """
    out: list[list[str]] = []
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            out.append([f"{name}: only in the first: {_value(a[name])}"])
            continue
        if name not in a:
            out.append([f"{name}: only in the second: {_value(b[name])}"])
            continue
        x, y = a[name], b[name]
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            added = [i for i in y if i not in x]
            removed = [i for i in x if i not in y]
            lines = [f"{name}:"]
            lines += [f"  + {_value(i)}" for i in added]
            lines += [f"  - {_value(i)}" for i in removed]
            if not added and not removed:
                lines = [f"{name}: the same items, counted or ordered differently"]
            out.append(lines)
        elif isinstance(x, dict) and isinstance(y, dict):
            lines = [f"{name}:"]
            for k in sorted(x.keys() | y.keys()):
                if k not in x:
                    lines.append(f"  + {k}: {_value(y[k])}")
                elif k not in y:
                    lines.append(f"  - {k}: {_value(x[k])}")
                elif x[k] != y[k]:
                    lines.append(f"  ~ {k}: {_value(x[k])} → {_value(y[k])}")
            out.append(lines)
        else:
            line = f"{name}: {_value(x)} → {_value(y)}"
            same_ref = a.get("parent_image") == b.get("parent_image") and a.get("parent_image")
            if name == "parent_image_id" and same_ref:
                line += f" (the image {a['parent_image']} changed since the first was made)"
            out.append([line])
    return out


def build_json(b: BuildInfo) -> dict[str, Any]:
    """A build as ``--output json`` prints it."""
    return {
        "key": b.key,
        "kind": b.kind,
        "status": b.status,
        "build_digest": b.build_digest or None,
        "reference": b.reference or None,
        "image_id": b.image_id or None,
        "size_bytes": b.size_bytes,
        "duration_seconds": b.duration_seconds,
        "create_time": time_json(b.created_at),
        "last_used_time": time_json(b.last_used_at),
        "run_ids": list(b.run_ids),
        "material": b.material,
        "error": b.error or None,
        "source": b.source or None,
        "pushed_to": b.pushed_to or None,
    }


# ---- the commands ----


@click.group("builds", epilog=EPILOG)
def builds() -> None:
    """Builds of environments: images and virtualenvs, each made once per key and reused.

    A build's key covers what goes into it (see docs/builds.md): the environment's build
    digest, the parent image's id, the Plait version and the recipe version. `plait builds
    explain` shows why two builds are not one.
    """


@builds.command("list", epilog=EPILOG)
@click.option("--limit", "-n", default=50, show_default=True, help="How many builds to show.")
@click.option("--kind", type=click.Choice(["image", "venv"]), help="Only builds of this kind.")
@output_option
def builds_list(limit: int, kind: str | None, output: str) -> None:
    """List builds, the most recently used first.

    \b
    Columns: the key's first 12 hex digits, image or venv, the status, the size, how long
    ago it was made, when a run last used it, how many runs used it, and where it is.
    With --output json: {"builds": [BUILD, ...]}, each as `plait builds show --output json`
    prints it.

    \b
    Examples:
      plait builds list
      plait builds list --kind image -n 10
    """
    from rich.table import Table
    from rich.text import Text

    try:
        found = _client().list_builds(limit=limit, kind=kind or "")
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json({"builds": [build_json(b) for b in found]})
        return
    if not found:
        click.echo(
            "no builds yet: one is made when a step's environment needs an image or a "
            "virtualenv (see docs/builds.md)"
        )
        return
    now = time.time()
    table = Table("key", "kind", "status", "size", "age", "last used", "runs", "reference")
    for b in found:
        runs = f"{len(b.run_ids)}+" if len(b.run_ids) >= 100 else str(len(b.run_ids))
        table.add_row(
            b.key[:12],
            b.kind,
            f"[{_STATUS_COLOUR.get(b.status, 'default')}]{b.status}[/]",
            size_text(b.size_bytes) if b.size_bytes else "-",
            age_text(now - b.created_at) if b.created_at else "-",
            f"{age_text(now - b.last_used_at)} ago" if b.last_used_at else "-",
            runs,
            Text(b.reference or "-"),
        )
    get_console().print(table)


@builds.command("show", epilog=EPILOG)
@click.argument("key")
@output_option
def builds_show(key: str, output: str) -> None:
    """Show a build: where it is, its size, its key material and the runs that used it.

    KEY may be a unique prefix of at least 6 hex digits.

    \b
    With --output json: key, kind, status, build_digest, reference, image_id, size_bytes,
    duration_seconds, create_time, last_used_time, run_ids (newest first, at most 100),
    material (the key material), error, source (built or pulled) and pushed_to.

    \b
    Example:
      plait builds show 3fa2c1
    """
    b = _get(_client(), key)
    if output == "json":
        print_json(build_json(b))
        return
    now = time.time()
    lines = [
        f"build {b.key}",
        f"  kind: {b.kind}",
        f"  status: {b.status}",
        f"  reference: {b.reference or '-'}",
    ]
    if b.image_id:
        lines.append(f"  image id: {b.image_id}")
    lines += [
        f"  build digest: {b.build_digest or '-'}",
        f"  size: {size_text(b.size_bytes)}",
        f"  made in: {b.duration_seconds:.1f}s",
        f"  created: {_when(b.created_at, now)}",
        f"  last used: {_when(b.last_used_at, now)}",
        f"  source: {b.source or '-'}"
        + ("  (built here)" if b.source == "built" else "")
        + ("  (pulled from the registry)" if b.source == "pulled" else ""),
        f"  pushed to: {b.pushed_to or '-'}",
    ]
    if b.error:
        lines.append(f"  error: {b.error}")
    lines.append("key material (the key is the sha256 of its canonical JSON):")
    lines += ["  " + line for line in json.dumps(b.material, indent=2, sort_keys=True).split("\n")]
    more = "+" if len(b.run_ids) >= 100 else ""
    lines.append(f"runs ({len(b.run_ids)}{more}, newest first):" if b.run_ids else "runs: none")
    lines += [f"  {r}" for r in b.run_ids]
    click.echo("\n".join(lines))


@builds.command("explain", epilog=EPILOG)
@click.argument("key")
@click.argument("other", required=False)
def builds_explain(key: str, other: str | None) -> None:
    """Show what a build's key is made of; given two builds, which components differ.

    A build is reused only when every component of its key material is the same: the
    environment's (parent image reference, Python version, requirements, apt packages), the
    parent image's id, the Plait version and the recipe version. With OTHER, each component
    that differs is printed with both values; for lists (requirements, apt packages) the items
    added (+) and removed (-) from KEY to OTHER.

    \b
    Examples:
      plait builds explain 3fa2c1
      plait builds explain 3fa2c1 9b8a7c    # why was 9b8a7c built rather than 3fa2c1 reused?
    """
    client = _client()
    a = _get(client, key)
    if other is None:
        click.echo(f"build {a.key} ({a.kind}, {a.status})")
        click.echo("its key is the sha256 of this key material (canonical JSON):")
        for line in material_lines(a.material):
            click.echo(f"  {line}")
        return
    b = _get(client, other)
    diffs = diff_material(a.material, b.material)
    pair = f"{a.key[:12]} and {b.key[:12]}"
    if not diffs:
        click.echo(f"builds {pair} have the same key material")
        return
    n = len(diffs)
    click.echo(f"builds {pair} differ in {n} component{'s' if n != 1 else ''} (first → second):")
    for lines in diffs:
        for line in lines:
            click.echo(f"  {line}")


def _removal_line(b: BuildInfo, now: float) -> str:
    used = f"last used {age_text(now - b.last_used_at)} ago" if b.last_used_at else "never used"
    size = size_text(b.size_bytes) if b.size_bytes else "-"
    return f"  {b.key[:12]}  {b.kind:5}  {b.status:8}  {size:>10}  {used}  {b.reference or '-'}"


@builds.command("prune", epilog=EPILOG)
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option(
    "--unused-for",
    callback=_duration_option,
    default=None,
    metavar="DURATION",
    help=f"Only builds no run used for this long (90s, 30m, 12h, 7d, 2w; 0: any age) "
    f"[default: {DEFAULT_UNUSED_FOR} without KEY, any age with KEY].",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
def builds_prune(keys: tuple[str, ...], unused_for: float | None, dry_run: bool, yes: bool) -> None:
    """Remove builds: their images or virtualenvs, and their records.

    With KEY (keys or unique prefixes), those builds; without, every build unused for
    --unused-for. Never a build being made, nor one used by a run that has not ended. On a
    terminal the builds are listed and confirmation asked first (-y skips it). A removed build
    is made again when a run needs it.

    \b
    Examples:
      plait builds prune --dry-run
      plait builds prune --unused-for 30d -y
      plait builds prune 3fa2c1 9b8a7c
    """
    if unused_for is None:
        unused_for = 0.0 if keys else parse_duration(DEFAULT_UNUSED_FOR)
    client = _client()
    ask = not dry_run and not yes and sys.stdin.isatty()
    try:
        if dry_run or ask:
            found = client.prune_builds(unused_for_seconds=unused_for, keys=keys, dry_run=True)
            _print_pruned(found.builds, found.freed_bytes, "would remove")
            if dry_run or not found.builds:
                return
            click.confirm(f"remove these {len(found.builds)} build(s)?", abort=True)
            keys = tuple(b.key for b in found.builds)  # what was confirmed, and no more
        removed, freed = _prune(client, unused_for, keys)
    except PlaitError as exc:
        fail(str(exc))
    _print_pruned(removed, freed, "removed")


def _prune(client: Client, unused_for: float, keys: Sequence[str]) -> tuple[list[BuildInfo], int]:
    if len(keys) <= MAX_KEYS:
        done = client.prune_builds(unused_for_seconds=unused_for, keys=keys)
        return list(done.builds), done.freed_bytes
    removed: list[BuildInfo] = []
    freed = 0
    for i in range(0, len(keys), MAX_KEYS):
        done = client.prune_builds(unused_for_seconds=unused_for, keys=keys[i : i + MAX_KEYS])
        removed += done.builds
        freed += done.freed_bytes
    return removed, freed


def _print_pruned(found: Sequence[BuildInfo], freed: int, verb: str) -> None:
    if not found:
        click.echo("no build to remove" if verb == "would remove" else "removed no build")
        return
    now = time.time()
    n = len(found)
    click.echo(f"{verb} {n} build{'s' if n != 1 else ''}, {size_text(freed)}:")
    for b in found:
        click.echo(_removal_line(b, now))

"""``plait runs explain RUN STEP``: why a step ran or was served from the cache."""

from __future__ import annotations

import click

from plait.cli._common import EPILOG, fail, output_option, print_json
from plait.errors import PlaitError


@click.command("explain", epilog=EPILOG)
@click.argument("run_id")
@click.argument("step_id")
@output_option
def runs_explain(run_id: str, step_id: str, output: str) -> None:
    """Say why step STEP_ID of run RUN_ID ran or was served from the cache.

    Its cache key is compared with the nearest earlier cache entry of the same step (same
    pipeline, same step id), component by component: code, outputs, each parameter and input,
    environment, cache_version; each that differs is printed with both values. A CACHED step
    names the run whose outputs it reuses.

    With --output json: {run_id, step_id, status, cache_key, reason, cached_from_run,
    earlier_run, differences: [{component, name, value, earlier_value}, ...]}.
    """
    from plait._client import Client

    try:
        why = Client.default().explain_step(run_id, step_id)
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json(
            {
                "run_id": why.run_id,
                "step_id": why.step_id,
                "status": str(why.status),
                "cache_key": why.cache_key,
                "reason": why.reason,
                "cached_from_run": why.cached_from_run or None,
                "earlier_run": why.earlier_run or None,
                "differences": [
                    {
                        "component": d.component,
                        "name": d.name or None,
                        "value": d.value,
                        "earlier_value": d.earlier_value,
                    }
                    for d in why.differences
                ],
            }
        )
        return
    click.echo(f"step {why.step_id} of run {why.run_id}: {why.status}")
    click.echo(why.reason)
    if why.cached_from_run:
        click.echo(f"outputs from run {why.cached_from_run}")
    if why.cache_key:
        click.echo(f"cache key {why.cache_key}")
    if why.differences:
        click.echo(f"differs from the entry of run {why.earlier_run}:")
        for d in why.differences:
            click.echo(f"  {d.describe()}")

"""`touchpoint` command line: local stack, setup, publishing, the worker, live view and the benchmark."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings import get_settings

app = typer.Typer(help="Touchpoint pipeline: customer touchpoints in, live CX and UX indicators out.",
                  no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Tansu broker and ClickHouse server on loopback.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console()


def _print_services(statuses: list) -> None:
    table = Table("service", "state", "pid", "address", "detail")
    for s in statuses:
        table.add_row(s.name, "[green]running[/]" if s.running else "[red]stopped[/]",
                      str(s.pid or "-"), s.address, s.detail)
    console.print(table)


@stack_app.command("up")
def stack_up(timeout: float = typer.Option(90.0, help="Seconds to wait for each server.")) -> None:
    """Start the broker and ClickHouse (idempotent) and wait until both answer."""
    from pipeline.stack import local

    _print_services(local.up(get_settings(), timeout_s=timeout))


@stack_app.command("down")
def stack_down() -> None:
    """Stop the servers this project started."""
    from pipeline.stack import local

    _print_services(local.down(get_settings()))


@stack_app.command("status")
def stack_status() -> None:
    """Show whether each server runs and answers."""
    from pipeline.stack import local

    statuses = local.status(get_settings())
    _print_services(statuses)
    if not all(s.running for s in statuses):
        raise typer.Exit(1)


@app.command()
def init() -> None:
    """Create the Kafka topics, register the Avro schemas and apply ClickHouse migrations (idempotent)."""
    from pipeline.adapters.clickhouse import DatabaseInUse
    from pipeline.bootstrap import initialise

    settings = get_settings()
    try:
        report = initialise(settings)
    except DatabaseInUse as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"kafka: topics created {report.topics_created or 'none (all there)'}")
    console.print(f"registry: subject {settings.registry.subject} holds schema ids {report.schema_ids}")
    console.print(f"clickhouse: database {settings.clickhouse.database}, migrations applied "
                  f"{report.migrations_applied or 'none (up to date)'}")


@app.command()
def worker() -> None:
    """Run a stream worker: consume touchpoints, compute indicator windows and alerts, write to ClickHouse."""
    from pipeline.adapters.clickhouse import DatabaseInUse
    from pipeline.adapters.worker import run_worker

    try:
        run_worker(get_settings())
    except DatabaseInUse as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def forget(
    identifier: str = typer.Argument(..., help="kind:value (e.g. user_id:u-42), or a bare value to try every kind."),
) -> None:
    """Erase a person: identity state on every worker and their rows in ClickHouse. Idempotent and audited."""
    from pipeline.erasure import forget as erase

    report = erase(get_settings(), identifier)
    console.print(f"Erased {len(report.identifiers)} identifiers and {len(report.person_ids)} person ids "
                  f"({report.rows_before} touchpoints deleted). Indicator windows hold no person data and stay.")


@app.command()
def publish(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON Lines, one touchpoint per line."),
    schema_version: int = typer.Option(0, help="Subject version to write with; 0 = the newest."),
) -> None:
    """Validate every line against the contract, report bad lines by number and reason, publish the rest."""
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher, read_jsonl
    from pipeline.contract.registry import open_registry

    settings = get_settings()
    encoder = TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject,
                                schema_version or None)
    good, bad = read_jsonl(file, encoder, int(time.time() * 1000), settings.window.max_future_s * 1000)
    for line in bad:
        console.print(f"[red]line {line.line_number}[/]: {line.reason}")
    publisher = TouchpointPublisher(settings.kafka.bootstrap_servers, settings.kafka.topic, encoder)
    publisher.publish_many(good)
    publisher.close()
    console.print(f"published {len(good)} touchpoints to {settings.kafka.topic}; {len(bad)} bad lines skipped")
    if bad:
        raise typer.Exit(1)


@app.command()
def generate(
    scenario: str = typer.Option("mixed", help="banking_app, hospital_booking, mixed, conversion or churn."),
    rate: float = typer.Option(200.0, help="Events per second (event time and, when publishing, wall time)."),
    count: int = typer.Option(0, help="Events to make; 0 = run for --duration seconds."),
    duration: float = typer.Option(60.0, help="Seconds to run when --count is 0."),
    seed: int = typer.Option(0),
    schema_version: int = typer.Option(1, help="1, 2 or 3: which contract version to write."),
    out: Path | None = typer.Option(None, help="Write JSON Lines here instead of publishing."),
) -> None:
    """Make realistic multi-channel traffic, paced in real time, and publish it (or write it to a file)."""
    from pipeline.generate.scenarios import SCENARIOS

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    total = count or int(rate * duration)
    settings = get_settings()
    if out is not None:
        import json

        from pipeline.generate.scenarios import generate as make

        with out.open("w") as handle:
            for event in make(scenario, total, seed=seed, start_ms=int(time.time() * 1000), events_per_s=rate,
                              schema_version=schema_version):
                handle.write(json.dumps(event) + "\n")
        console.print(f"wrote {total} touchpoints to {out}")
        return
    from pipeline.live import publish_paced

    sent = publish_paced(settings, scenario, total, rate=rate, seed=seed, schema_version=schema_version)
    console.print(f"published {sent} touchpoints of scenario {scenario} at {rate:g}/s")


@app.command()
def watch(
    refresh: float = typer.Option(2.0, help="Seconds between refreshes."),
    minutes: int = typer.Option(10, help="How many minutes of windows to show."),
    once: bool = typer.Option(False, help="Print one snapshot and exit."),
) -> None:
    """Live CX and UX indicators and alerts, read from ClickHouse."""
    from pipeline.live import watch as live_watch

    live_watch(get_settings(), console, refresh_s=refresh, minutes=minutes, once=once)


@app.command()
def bench(
    events: int = typer.Option(200_000, help="Generated events to publish and process."),
    identity: bool = typer.Option(True, help="Resolve persons through the identity graph (--no-identity: off)."),
    preload_identities: int = typer.Option(0, help="Identifiers to put in the identity graph before the run."),
    compare: bool = typer.Option(False, help="Run without identity, then with it and --preload-identities; "
                                             "print both and the ratio."),
    drain: bool = typer.Option(False, help="Publish the events while the worker is paused, then time the worker "
                                           "draining them (its own rate, publisher off the cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Measure end-to-end, raw consume and decode-only rates of the same events in one run."""
    import json

    from pipeline.bench import run_bench
    from pipeline.stack import local

    settings = get_settings()
    local.up(settings)
    if compare:
        runs = [run_bench(settings, events, identity=False, drain=drain),
                run_bench(settings, events, identity=True, preload_identities=preload_identities, drain=drain)]
    else:
        runs = [run_bench(settings, events, identity=identity, preload_identities=preload_identities, drain=drain)]
    if as_json:
        print(json.dumps([r.as_dict() for r in runs] if compare else runs[0].as_dict()))
        return
    for result in runs:
        table = Table("measure", "events/s", "vs end to end")
        e2e_name = ("end to end, draining a backlog (Kafka -> rows in ClickHouse)" if result.drain
                    else "end to end (published -> rows in ClickHouse)")
        for name, rate in ((e2e_name, result.e2e_events_per_s),
                           ("raw aiokafka consume", result.raw_consume_events_per_s),
                           ("fastavro decode only", result.decode_events_per_s),
                           ("kafka-python publish", result.publish_events_per_s)):
            table.add_row(name, f"{rate:,.0f}", f"{rate / result.e2e_events_per_s:.1f}x")
        console.print(table)
        identity_note = (f"identity on, {result.preloaded_identifiers:,} identifiers preloaded"
                         if result.identity else "identity off")
        console.print(f"{result.events:,} events, {result.partitions} partitions, one worker, {identity_note}, "
                      f"{result.e2e_seconds:.1f} s end to end, worker RSS {result.worker_rss_mib:,.0f} MiB")
        if result.graph_bytes_per_identifier:
            console.print(f"identity graph: {result.graph_bytes_per_identifier:,.0f} bytes per identifier")
    if compare:
        ratio = runs[1].e2e_events_per_s / runs[0].e2e_events_per_s
        console.print(f"end to end with identity / without: {ratio:.0%}")


@app.command()
def demo(
    duration: float = typer.Option(150.0, help="Seconds of generated traffic."),
    rate: float = typer.Option(300.0, help="Events per second."),
) -> None:
    """Bring up the local stack and run the whole pipeline on generated traffic, showing live results."""
    from pipeline.live import run_demo

    run_demo(get_settings(), console, duration_s=duration, rate=rate)


if __name__ == "__main__":
    app()

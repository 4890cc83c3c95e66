"""`touchpoint` command line: local stack, setup, publishing, the worker, live view and the benchmark."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings import get_settings

app = typer.Typer(help="Touchpoint pipeline: customer touchpoints in, live CX and UX indicators out.",
                  no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Apache Kafka (or Tansu) broker and ClickHouse server on loopback.",
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
    from pipeline.bootstrap import initialise

    settings = get_settings()
    report = initialise(settings)
    console.print(f"kafka: topics created {report.topics_created or 'none (all there)'}, settings updated on "
                  f"{report.topics_reconfigured or 'none (all as stated in pipeline/topics.py)'}")
    console.print(f"registry: subject {settings.registry.subject} holds schema ids {report.schema_ids}")
    console.print(f"clickhouse: database {settings.clickhouse.database}, migrations applied "
                  f"{report.migrations_applied or 'none (up to date)'}")


@app.command()
def worker() -> None:
    """Run a stream worker: consume touchpoints, compute indicator windows and alerts, write to ClickHouse."""
    from pipeline.adapters.worker import run_worker

    run_worker(get_settings())  # a database another pipeline owns ends it with one line (operator_message)


@app.command()
def forget(
    identifier: str = typer.Argument(..., help="kind:value (e.g. user_id:u-42), or a bare value to try every kind."),
) -> None:
    """Erase a person: identity state on every worker and their rows in ClickHouse. Idempotent and audited."""
    from pipeline.erasure import forget as erase

    report = erase(get_settings(), identifier)
    console.print(f"Erased {len(report.identifiers)} identifiers and {len(report.person_ids)} person ids "
                  f"({report.rows_before} touchpoints deleted). Indicator windows hold no person data and stay.")


BAD_LINES_SHOWN = 20


@app.command()
def publish(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON Lines, one touchpoint per line."),
    schema_version: int = typer.Option(0, help="Subject version to write with; 0 = the newest."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Publish the good lines even if some are bad "
                                                            "(by default a file with a bad line publishes nothing)."),
) -> None:
    """Check every line (size, UTF-8, JSON, contract) first, report bad lines by number and reason, then publish
    nothing or every good line and print what the broker acknowledged."""
    from pipeline.publish import publish_file

    settings = get_settings()
    report = publish_file(settings, file, int(time.time() * 1000), schema_version=schema_version or None,
                          skip_bad=skip_bad)
    for line in report.bad[:BAD_LINES_SHOWN]:
        console.print(f"[red]line {line.line_number}[/]: {line.reason}", highlight=False)
    if len(report.bad) > BAD_LINES_SHOWN:
        console.print(f"... and {len(report.bad) - BAD_LINES_SHOWN} more bad lines")
    if not report.sent:
        console.print(f"published nothing: {len(report.bad)} bad lines, {report.good} good"
                      + ("; fix the file or pass --skip-bad" if report.bad else ""))
        raise typer.Exit(1 if report.bad else 0)
    for line in report.undelivered[:BAD_LINES_SHOWN]:
        console.print(f"[red]line {line.line_number}[/]: not delivered: {line.reason}", highlight=False)
    console.print(f"delivered {report.delivered} of {report.good} touchpoints to {settings.kafka.topic} "
                  f"(acknowledged by every in-sync replica); {len(report.bad)} bad lines skipped"
                  + (f"; {len(report.undelivered)} NOT delivered" if report.undelivered else ""))
    if report.bad or report.undelivered:
        raise typer.Exit(1)


@app.command()
def generate(
    scenario: str = typer.Option("mixed", help="banking_app, hospital_booking or mixed."),
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


def operator_message(exc: BaseException) -> str | None:
    """One line for an operator's everyday mistake (a server not reachable, an invalid setting, a refused
    request), None for anything else: a bug, whose traceback is worth seeing."""
    from clickhouse_driver.errors import NetworkError, SocketTimeoutError
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError
    from pydantic import ValidationError

    from pipeline.adapters.clickhouse import DatabaseInUse
    from pipeline.contract.registry import RegistryError
    from pipeline.erasure import ErasureRefused
    from pipeline.stack.local import StackError

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in chain:
        if isinstance(error, ValidationError):
            problems = error.errors()
            first = problems[0]
            name = ".".join(str(part) for part in first["loc"])
            env = "TOUCHPOINT_" + "__".join(str(part).upper() for part in first["loc"])
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return (f"invalid setting {name} ({env} or touchpoint.toml): {first['msg']}; "
                    f"got {first.get('input')!r}{more}")
        if isinstance(error, (ErasureRefused, StackError, DatabaseInUse)):
            return str(error)
        if isinstance(error, KafkaConnectionError) or (
                isinstance(error, KafkaTimeoutError) and "bootstrap" in str(error)):
            return (f"cannot reach the Kafka broker at {get_settings().kafka.bootstrap_servers} "
                    "(kafka.bootstrap_servers, TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS): is it running and is the "
                    "address right? `touchpoint stack status` shows the local stack")
        if isinstance(error, (NetworkError, SocketTimeoutError)):
            ch = get_settings().clickhouse
            reason = str(error).split("\n")[0]
            return (f"cannot reach ClickHouse at {ch.host}:{ch.port} (clickhouse.host, clickhouse.port, "
                    f"TOUCHPOINT_CLICKHOUSE__PORT): {reason}; is it running? `touchpoint stack status` shows the "
                    "local stack")
        if isinstance(error, RegistryError):
            return (f"schema registry problem (registry.url, TOUCHPOINT_REGISTRY__URL = "
                    f"{get_settings().registry.url}): {error}")
    return None


def main() -> None:
    """The `touchpoint` command: operators' mistakes end with one line on stderr and exit code 2."""
    if sys.argv[1:2] != ["worker"]:  # a one-shot command says "cannot reach ClickHouse" once, without the
        logging.getLogger("clickhouse_driver").setLevel(logging.ERROR)  # driver's own warning and traceback
    try:
        app()
    except Exception as exc:
        message = operator_message(exc)
        if message is None:
            raise
        Console(stderr=True).print(f"touchpoint: {message}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

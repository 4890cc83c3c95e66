"""`touchpoint` command line: the local stack, schema and table setup, publishing, the worker, the benchmark."""

from __future__ import annotations

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
def stack_up(timeout: float = typer.Option(90.0, help="Seconds to wait for each server to be ready.")) -> None:
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


if __name__ == "__main__":
    app()

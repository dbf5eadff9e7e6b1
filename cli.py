"""mssl-repair command line: thin wrappers that parse, check and call engine/ (the commands are in commands/).

Exit status: 0 on full success, 1 when some inputs failed (the rest done), 2 on usage errors.
"""
from __future__ import annotations

import sys

import click

from commands.engines import bench, export_command
from commands.evaluate import attack, calibrate, evaluate, worst_case
from commands.repair import repair
from commands.serve import serve
from commands.train import train, train_set


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Repair adversarially attacked images with multiple self-supervised tasks (Lawhon & Ducrest)."""


for command in (train, train_set, repair, serve, attack, evaluate, worst_case, calibrate, export_command, bench):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())

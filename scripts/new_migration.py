"""Autogenerate a new revision for one service: python scripts/new_migration.py auth "msg".

Generates against a scratch SQLite database upgraded to head, so no server is needed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from shared.data import migrations


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("auth", "agent"):
        print(__doc__, file=sys.stderr)
        return 2
    service, message = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scratch.db'}"
        migrations.upgrade(service, url)
        command.revision(migrations.alembic_config(service, url), message, autogenerate=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

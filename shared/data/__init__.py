"""Databases, units of work, migrations, Redis clients."""

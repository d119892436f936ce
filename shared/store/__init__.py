"""The database layer both services share: schema, migrations, the model registry and market data."""

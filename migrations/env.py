"""Alembic environment: the URL comes from SYNC_DATABASE_URL unless the caller set one."""

from logging.config import fileConfig

from alembic import context

from sync.database import create_engine
from sync.settings import Settings
from sync.tables import metadata

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
engine = create_engine(url, create=True)

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()
engine.dispose()

-- The compose Postgres serves two databases: `mlflow` (created from POSTGRES_DB) and `prefect`.
CREATE DATABASE prefect;

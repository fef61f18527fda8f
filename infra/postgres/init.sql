-- The compose Postgres serves two databases: `mlflow` (created from POSTGRES_DB) and `prefect`.
CREATE DATABASE prefect;
-- MLflow's basic-auth users and permissions (team mode), apart from the tracking data.
CREATE DATABASE mlflow_auth;

# MLflow tracking + registry server for the team stack: Postgres backend, S3 (MinIO) artifacts.
# The version matches requirements.lock. [auth]: the basic-auth app of team mode (infra/team).
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary boto3 cryptography==50.0.2
ENV MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
EXPOSE 5000

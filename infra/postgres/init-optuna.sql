-- Run once by the postgres image on a fresh data volume (/docker-entrypoint-initdb.d): the Optuna study
-- storage gets its own database beside Prefect's (POSTGRES_DB), so neither schema's migrations see the other.
CREATE DATABASE optuna;

"""Local services of the stack (object store, ...), started and stopped as managed processes.

Each service writes its state (pid file, logs, data) under one project-local directory, so a
``wsdan stack up`` in one process and a ``wsdan stack down`` in another find the same server.
"""

from wsdan.services.mlflow_server import MlflowServer, MlflowServerConfig, MlflowServerError
from wsdan.services.seaweedfs import (
    S3Server,
    S3ServerConfig,
    S3ServerError,
    credentials_from_env,
    find_free_port,
    find_free_ports,
    find_weed_binary,
    generate_credentials,
)

__all__ = [
    "MlflowServer",
    "MlflowServerConfig",
    "MlflowServerError",
    "S3Server",
    "S3ServerConfig",
    "S3ServerError",
    "credentials_from_env",
    "find_free_port",
    "find_free_ports",
    "find_weed_binary",
    "generate_credentials",
]

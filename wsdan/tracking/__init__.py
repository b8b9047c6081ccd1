"""MLflow integration: the pyfunc model, the registry's champion alias, run helpers.

The model code (``wsdan.model`` and friends) imports no MLflow; this package does.
"""

from wsdan.tracking.pyfunc import WSDANPyfunc, log_wsdan_model, model_signature
from wsdan.tracking.registry import (
    CHAMPION,
    RegistrationResult,
    champion_version,
    register_if_better,
)
from wsdan.tracking.runs import (
    attention_figure,
    confusion_figure,
    log_config,
    log_figure,
    resolve_tracking_uri,
    setup_experiment,
)

__all__ = [
    "CHAMPION",
    "RegistrationResult",
    "WSDANPyfunc",
    "attention_figure",
    "champion_version",
    "confusion_figure",
    "log_config",
    "log_figure",
    "log_wsdan_model",
    "model_signature",
    "register_if_better",
    "resolve_tracking_uri",
    "setup_experiment",
]

"""loraburst: QLoRA fine-tunes of open LLMs on rented GPUs, as simply as calling a function.

The public API is this module's ``__all__``; everything in ``loraburst._*`` is private.
``loraburst.providers`` is the plugin-author API and ``loraburst.testing`` the provider
contract suite.
"""

from __future__ import annotations

from ._api.batch import Batch, BatchResult
from ._api.export import ExportResult, ExportRun, export
from ._api.job import Job
from ._api.result import Attempt, JobResult
from ._api.spec import (
    DataSource,
    EvaluationConfig,
    HubConfig,
    JobSpec,
    LoraConfig,
    ObjectiveConfig,
    QuantConfig,
    TrainConfig,
)
from ._cost.estimate import Estimate, EstimateRow
from ._exceptions import (
    AgentError,
    ArtifactError,
    AuthError,
    BudgetExceededError,
    CapacityError,
    ConfigError,
    DatasetError,
    EstimateError,
    HostKeyMismatchError,
    InstanceLostError,
    JobCancelledError,
    JobError,
    LocalStorageError,
    LoraburstError,
    PlacementError,
    ProviderAPIError,
    ProviderError,
    RateLimitError,
    TeardownError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "ArtifactError",
    "Attempt",
    "AuthError",
    "Batch",
    "BatchResult",
    "BudgetExceededError",
    "CapacityError",
    "ConfigError",
    "DataSource",
    "DatasetError",
    "Estimate",
    "EstimateError",
    "EstimateRow",
    "EvaluationConfig",
    "ExportResult",
    "ExportRun",
    "HostKeyMismatchError",
    "HubConfig",
    "InstanceLostError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobResult",
    "JobSpec",
    "LocalStorageError",
    "LoraConfig",
    "LoraburstError",
    "ObjectiveConfig",
    "PlacementError",
    "ProviderAPIError",
    "ProviderError",
    "QuantConfig",
    "RateLimitError",
    "TeardownError",
    "TrainConfig",
    "TransportError",
    "__version__",
    "export",
]

"""loraburst: QLoRA fine-tunes of open LLMs on rented GPUs, as simply as calling a function.

The public API is this module's ``__all__``; everything in ``loraburst._*`` is private.
``loraburst.providers`` is the plugin-author API and ``loraburst.testing`` the provider
contract suite.
"""

from __future__ import annotations

from ._batch import Batch as Batch, BatchResult as BatchResult
from ._estimate import Estimate as Estimate, EstimateRow as EstimateRow
from ._exceptions import (
    AgentError as AgentError,
    ArtifactError as ArtifactError,
    AuthError as AuthError,
    BudgetExceededError as BudgetExceededError,
    CapacityError as CapacityError,
    ConfigError as ConfigError,
    DatasetError as DatasetError,
    EstimateError as EstimateError,
    JobCancelledError as JobCancelledError,
    JobError as JobError,
    LoraburstError as LoraburstError,
    PlacementError as PlacementError,
    ProviderError as ProviderError,
    TeardownError as TeardownError,
    TransportError as TransportError,
)
from ._job import Job as Job
from ._result import Attempt as Attempt, JobResult as JobResult
from ._spec import (
    JobSpec as JobSpec,
    LoraConfig as LoraConfig,
    QuantConfig as QuantConfig,
    TrainConfig as TrainConfig,
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
    "DatasetError",
    "Estimate",
    "EstimateError",
    "EstimateRow",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobResult",
    "JobSpec",
    "LoraConfig",
    "LoraburstError",
    "PlacementError",
    "ProviderError",
    "QuantConfig",
    "TeardownError",
    "TrainConfig",
    "TransportError",
    "__version__",
]

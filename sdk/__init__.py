"""loraburst: QLoRA fine-tunes of open LLMs on rented GPUs, as simply as calling a function.

The public API is this module's ``__all__``; everything in ``loraburst._*`` is private.
``loraburst.providers`` is the plugin-author API and ``loraburst.testing`` the provider
contract suite.
"""

from __future__ import annotations

from ._api.batch import Batch as Batch
from ._api.batch import BatchResult as BatchResult
from ._api.export import ExportResult as ExportResult
from ._api.export import ExportRun as ExportRun
from ._api.export import export as export
from ._api.job import Job as Job
from ._api.result import Attempt as Attempt
from ._api.result import JobResult as JobResult
from ._api.spec import (
    DataSource as DataSource,
)
from ._api.spec import (
    EvaluationConfig as EvaluationConfig,
)
from ._api.spec import (
    HubConfig as HubConfig,
)
from ._api.spec import (
    JobSpec as JobSpec,
)
from ._api.spec import (
    LoraConfig as LoraConfig,
)
from ._api.spec import (
    ObjectiveConfig as ObjectiveConfig,
)
from ._api.spec import (
    QuantConfig as QuantConfig,
)
from ._api.spec import (
    TrainConfig as TrainConfig,
)
from ._cost.estimate import Estimate as Estimate
from ._cost.estimate import EstimateRow as EstimateRow
from ._exceptions import (
    AgentError as AgentError,
)
from ._exceptions import (
    ArtifactError as ArtifactError,
)
from ._exceptions import (
    AuthError as AuthError,
)
from ._exceptions import (
    BudgetExceededError as BudgetExceededError,
)
from ._exceptions import (
    CapacityError as CapacityError,
)
from ._exceptions import (
    ConfigError as ConfigError,
)
from ._exceptions import (
    DatasetError as DatasetError,
)
from ._exceptions import (
    EstimateError as EstimateError,
)
from ._exceptions import (
    HostKeyMismatchError as HostKeyMismatchError,
)
from ._exceptions import (
    InstanceLostError as InstanceLostError,
)
from ._exceptions import (
    JobCancelledError as JobCancelledError,
)
from ._exceptions import (
    JobError as JobError,
)
from ._exceptions import (
    LocalStorageError as LocalStorageError,
)
from ._exceptions import (
    LoraburstError as LoraburstError,
)
from ._exceptions import (
    PlacementError as PlacementError,
)
from ._exceptions import (
    ProviderError as ProviderError,
)
from ._exceptions import (
    TeardownError as TeardownError,
)
from ._exceptions import (
    TransportError as TransportError,
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
    "ProviderError",
    "QuantConfig",
    "TeardownError",
    "TrainConfig",
    "TransportError",
    "__version__",
    "export",
]

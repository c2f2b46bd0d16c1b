"""Everything that happens on one device: onnxruntime sessions, providers, capacity,
and the numpy optimisers that training stages step with."""

from ._accelerators import Accelerator as Accelerator
from ._battery import BatterySource as BatterySource
from ._battery import BatteryState as BatteryState
from ._battery import default_battery_source as default_battery_source
from ._capacity import Capacity as Capacity
from ._capacity import probe_capacity as probe_capacity
from ._errors import InputMismatchError as InputMismatchError
from ._errors import ModelLoadError as ModelLoadError
from ._errors import RuntimeFault as RuntimeFault
from ._optim import Optimizer as Optimizer
from ._optim import OptimizerError as OptimizerError
from ._optim import make_optimizer as make_optimizer
from ._policy import Policy as Policy
from ._policy import PolicyError as PolicyError
from ._policy import parse_quiet_hours as parse_quiet_hours
from ._policy import refusal as refusal
from ._providers import Hardware as Hardware
from ._providers import available_providers as available_providers
from ._providers import find_accelerators as find_accelerators
from ._providers import probe_hardware as probe_hardware
from ._session import ModelSession as ModelSession
from ._session import TensorSpec as TensorSpec
from ._throughput import Throughput as Throughput
from ._throughput import cached_throughput as cached_throughput
from ._throughput import measure_throughput as measure_throughput

"""A diffusers `scheduler_config.json`, read the way diffusers' `from_config` reads it.

diffusers builds any scheduler class from any scheduler config: keys present in the JSON
override the target class's `__init__` defaults, keys absent from the JSON take those
defaults (never the defaults of the class named in `_class_name`). `SchedulerConfig.resolve`
does exactly that for one target, so each sampler here sees what the matching diffusers
scheduler would see after `TargetScheduler.from_config(pipe.scheduler.config)`.
"""

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from safealign_jax.convert.checkpoint import read_config
from safealign_jax.errors import UserError, check

FILENAME = "scheduler_config.json"
CLASS_NAMES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# The diffusers `__init__` defaults of the fields every scheduler class shares.
COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of one scheduler config file (keys starting with "_" dropped).

    Attributes:
      class_name: the file's `_class_name` (one of CLASS_NAMES).
      values: {field: value} exactly as in the JSON.
      source: the file path, for error messages.
    """

    class_name: str
    values: Mapping[str, Any]
    source: str = FILENAME

    def resolve(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """{field: value} for a scheduler class whose `__init__` defaults are `defaults`."""
        return {key: self.values.get(key, default) for key, default in defaults.items()}

    def error(self, field: str, value: Any, expected: str) -> UserError:
        """A UserError naming this file, the field, its value and what was expected."""
        return UserError(
            f"{self.source}: {field}={value!r} is not supported (expected {expected})."
        )

    def choice(self, fields: Mapping[str, Any], field: str, allowed: Sequence[Any]) -> Any:
        """fields[field], checked to be one of `allowed`."""
        value = fields[field]
        if value not in allowed:
            raise self.error(field, value, "one of " + ", ".join(repr(a) for a in allowed))
        return value

    def number(self, fields: Mapping[str, Any], field: str, integer: bool = False) -> float | int:
        """fields[field] as a finite float (or an int when `integer`)."""
        value = fields[field]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (integer and value != int(value)):
            raise self.error(field, value, "an integer" if integer else "a finite number")
        return int(value) if integer else float(value)

    def flag(self, fields: Mapping[str, Any], field: str) -> bool:
        """fields[field], checked to be a JSON boolean."""
        value = fields[field]
        if not isinstance(value, bool):
            raise self.error(field, value, "true or false")
        return value

    def require(self, fields: Mapping[str, Any], field: str, wanted: Any, sampler: str) -> None:
        """Refuses a value of `field` other than `wanted`, which `sampler` does not implement."""
        if fields[field] != wanted:
            raise self.error(
                field, fields[field], f"{wanted!r}: the only value {sampler} implements"
            )


def scheduler_config_from_dict(
    config: Mapping[str, Any], source: str = FILENAME
) -> SchedulerConfig:
    """Checks `_class_name` and wraps a parsed scheduler config dict."""
    class_name = config.get("_class_name")
    check(
        class_name in CLASS_NAMES,
        f"{source}: _class_name={class_name!r} is not supported "
        f"(expected one of {', '.join(CLASS_NAMES)}).",
    )
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    return SchedulerConfig(class_name=class_name, values=values, source=source)


def read_scheduler_config(folder: str) -> SchedulerConfig:
    """Reads `folder/scheduler_config.json` or, for a pipeline folder, `folder/scheduler/...`."""
    check(os.path.isdir(folder), f"{folder}: no such folder.")
    if not os.path.isfile(os.path.join(folder, FILENAME)):
        sub = os.path.join(folder, "scheduler")
        check(
            os.path.isfile(os.path.join(sub, FILENAME)),
            f"{folder}: neither a diffusers scheduler/ folder ({FILENAME}) "
            "nor a pipeline folder with scheduler/.",
        )
        folder = sub
    return scheduler_config_from_dict(read_config(folder, FILENAME), os.path.join(folder, FILENAME))

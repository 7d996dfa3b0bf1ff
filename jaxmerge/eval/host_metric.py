"""A task's own Python metric: `(prompt, response, reference) -> float` on decoded
responses, named in a config as "module:function" or "path/to/file.py:function". It is
called once on the first row when the task is prepared (before any model loads), and every
value must be a finite number (a bool counts as 0 or 1): anything else is refused naming
the task and the row."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from jaxmerge.eval.tasks import Task, TaskData

HostMetric = Callable[[str, str, str], float]


def resolve_host_metric(metric: HostMetric | str, base_dir: Path | None = None, task: str | None = None) -> HostMetric:
    """A callable, or "package.module:function", or "path/to/file.py:function" (relative to
    `base_dir`, the config file's directory). A reference that does not resolve (no such
    file, module or function; a module that fails to import) is a ValueError naming `task`
    and the reference."""
    if callable(metric):
        return metric
    where = f"{'' if task is None else f'task {task}: '}host_metric {metric!r}"
    module_name, _, function = metric.rpartition(":") if isinstance(metric, str) else ("", "", "")
    if not module_name or not function:
        raise ValueError(f"{where}: expected a function, 'module:function' or 'file.py:function'")
    path = (Path(module_name) if base_dir is None else Path(base_dir) / module_name) \
        if module_name.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ValueError(f"{where}: {path} not found")
    name = module_name if path is None else str(path)
    try:
        if path is not None:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if path is None and e.name is not None and (module_name + ".").startswith(e.name + "."):  # it, or its package
            raise ValueError(f"{where}: cannot import {module_name} ({_one_line(e)}); not on the Python path? "
                             "Or name a file: path/to/file.py:function") from None
        raise ValueError(f"{where}: importing {name} raised {_one_line(e)}") from e
    except Exception as e:  # the module's own code failed
        raise ValueError(f"{where}: importing {name} raised {_one_line(e)}") from e
    found = getattr(module, function, None)
    if not callable(found):
        raise ValueError(f"{where}: {module_name} has no function {function!r}")
    return found


def check_host_metric(task: Task) -> None:
    """Calls a host-metric task's metric on its first row (fitness, else validation, else
    test), once with the reference as the response and once with an empty response, as the
    search will: a metric that does not take (prompt, response, reference), raises, or
    returns anything but a finite number is refused, naming the task, before a model loads."""
    if task.host is None:
        return
    try:
        signature = inspect.signature(task.host)
    except (TypeError, ValueError):  # some builtins have none: the calls below check them
        signature = None
    if signature is not None:
        try:
            signature.bind("prompt", "response", "reference")
        except TypeError:
            raise ValueError(f"task {task.name}: host metric {_metric_name(task)} takes (prompt, response, "
                             f"reference); its signature is {signature}") from None
    split, data = next((s, d) for s, d in (("fitness", task.fitness), ("validation", task.validation),
                                           ("test", task.test)) if d is not None)
    for response, called in ((data.answers[0], "called with the reference as the response"),
                            ("", "called with an empty response")):
        host_score(task, data, split, 0, response, called)


def host_score(task: Task, data: TaskData, split: str, row: int, response: str, called: str = "") -> float:
    """The task's host metric on one row of a split and a response: a finite number (a bool
    is 0 or 1); anything else, or an exception, is a one-line ValueError naming the task, the
    row (its file and line where it was read from one) and the value. called: how it was
    called, for the error."""
    where = f"task {task.name}: host metric {_metric_name(task)} on {data.where(row, split)}" + \
        (f", {called}" if called else "")
    try:
        value = task.host(data.prompts[row], response, data.answers[row])
    except Exception as e:
        raise ValueError(f"{where}: raised {_one_line(e)}") from e
    number = _as_number(value)
    if number is None or not math.isfinite(number):
        text = repr(value)
        raise ValueError(f"{where}: returned {text if len(text) <= 80 else text[:77] + '...'}, not a finite number")
    return number


def _as_number(value) -> float | None:
    """A host metric's value as a float (Python, NumPy or JAX numbers and bools, 0-d arrays);
    None if it is not a number."""
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if getattr(value, "shape", None) == () and kind in ("b", "i", "u", "f"):
        value = value.item()
    if isinstance(value, (bool, np.bool_, numbers.Real)):
        return float(value)
    return None


def _metric_name(task: Task) -> str:
    metric = task.spec.host_metric
    return repr(metric) if isinstance(metric, str) else getattr(metric, "__qualname__", None) or repr(metric)


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())

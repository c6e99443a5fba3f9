"""Zero-shot accuracy through lm-evaluation-harness (`lm-eval`), on any in-memory model, dense or compressed.

The model is wrapped in lm-eval's `HFLM` as it is (no reload from disk), so a model whose linears were
swapped for `LowRankLinear` is evaluated exactly as it runs. Tasks come from lm-eval's registry, from
svdkit's own offline task folder (`svdkit/tasks`: smoke-level cloze tests), and from `include_path`.

Hub-backed tasks (arc_easy, piqa, hellaswag, ...) download their data from the Hugging Face hub. When the
hub is unreachable the data sets library is switched to offline mode for the duration of the call, so a
missing data set fails at once (instead of after minutes of retries) with a `ZeroShotError` naming the task.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ..errors import SvdkitError
from ..tasks import DEFAULT_TASK, SHIPPED_TAG, SHIPPED_TASKS, TASKS_DIR

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TASK", "SHIPPED_TASKS", "TASKS_DIR", "ZeroShotError", "check_tasks", "zero_shot"]

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ZeroShotError(SvdkitError, ValueError):
    """Raised for unknown tasks, tasks whose data cannot be loaded (e.g. hub data offline) and a missing lm-eval."""


# --------------------------------------------------------------------------------------------- network
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within `timeout` s (assumed True behind a proxy)."""
    if any(os.environ.get(k) for k in _PROXY_ENV):
        return True  # the direct connection says nothing about the proxied one
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        endpoint = urlparse("https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env_set() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in (*_OFFLINE_ENV, "TRANSFORMERS_OFFLINE"))


@contextmanager
def hub_offline() -> Iterator[None]:
    """Switch `huggingface_hub` and `datasets` to offline mode (env and the flags they read at import), then restore.

    In offline mode a data set that is not cached fails at once; cached data sets still load.
    """
    import datasets.config as ds_config
    from huggingface_hub import constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved_flags = [
        (obj, name, getattr(obj, name))
        for obj, name in (
            (hub_constants, "HF_HUB_OFFLINE"),
            (ds_config, "HF_HUB_OFFLINE"),
            (ds_config, "HF_DATASETS_OFFLINE"),
        )
        if hasattr(obj, name)
    ]
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    for obj, name, _ in saved_flags:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for obj, name, value in saved_flags:
            setattr(obj, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _offline_reason(offline: bool | None, names: Sequence[str]) -> str | None:
    """Why hub data should be loaded in offline mode (None: online), for `zero_shot`'s `offline` argument."""
    if offline is not None:
        return "offline=True was passed" if offline else None
    if set(names) <= {*SHIPPED_TASKS, SHIPPED_TAG}:
        return None  # svdkit's own tasks read only local files: no need to probe the network
    if _offline_env_set():
        return "HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE is set"
    if not hub_reachable():
        log.info("the Hugging Face hub is unreachable: hub-backed tasks load from the cache only")
        return "the Hugging Face hub is unreachable"
    return None


# --------------------------------------------------------------------------------------------- tasks
def _task_manager(paths: tuple[Path, ...], include_defaults: bool):
    """An lm-eval `TaskManager` over `paths` (plus lm-eval's own tasks if asked); indexing those takes ~5 s,
    so managers are cached per set of folders and their modification times."""
    key = tuple((str(p), p.stat().st_mtime_ns if p.exists() else 0) for p in paths)
    return _cached_task_manager(key, include_defaults)


@lru_cache(maxsize=4)
def _cached_task_manager(key: tuple[tuple[str, int], ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = [p for p, _ in key]
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def _task_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple[Path, ...]:
    """svdkit's task folder first, then the caller's folders (later folders override same-named tasks)."""
    if include_path is None:
        extra: list = []
    elif isinstance(include_path, (str, os.PathLike)):
        extra = [include_path]
    else:
        extra = list(include_path)
    paths = [TASKS_DIR]
    for p in extra:
        path = Path(p).expanduser().resolve()
        if not path.is_dir():
            raise ZeroShotError(f"include_path {str(p)!r} is not a folder of lm-eval task YAML files")
        paths.append(path)
    return tuple(paths)


def _resolve_tasks(tasks: Sequence[str], paths: tuple[Path, ...]):
    """The smallest TaskManager that knows every requested name (lm-eval's registry only when needed)."""
    local = _task_manager(paths, include_defaults=False)
    known = set(local.all_tasks)
    if all(t in known or os.path.isfile(t) for t in tasks):
        return local
    manager = _task_manager(paths, include_defaults=True)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        raise ZeroShotError(
            f"unknown task(s) {', '.join(map(repr, unknown))}: not in lm-eval's registry, svdkit's tasks "
            f"({', '.join(SHIPPED_TASKS)}) or include_path; expected a task, group or tag name or a task YAML file"
        )
    return manager


_NETWORK_ERROR_NAMES = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError", "DatasetNotFoundError")


def _is_network_error(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) says the hub could not be reached or has no such data."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _NETWORK_ERROR_NAMES:
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietShippedTasks(logging.Filter):
    """Drops lm-eval's advice about `custom_dataset` kwargs, logged for each of svdkit's shipped tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(SHIPPED_TASKS) and "Custom kwargs" in msg)


def _load_tasks(manager, tasks: Sequence[str], offline_reason: str | None) -> dict:
    """lm-eval's `TaskDict` for `tasks`, loaded one by one so that a failure names its task.

    With `offline_reason` set, the hub is in offline mode while the data loads (`hub_offline`).
    """
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    task_log, quiet = logging.getLogger("lm_eval.api.task"), _QuietShippedTasks()
    for name in tasks:
        task_log.addFilter(quiet)
        try:
            with hub_offline() if offline_reason else nullcontext():
                loaded = manager.load([name])
        except Exception as e:  # datasets/hub raise many types (ConnectionError, FileNotFoundError, HTTP errors)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            detail = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
            if not _is_network_error(e):
                raise ZeroShotError(
                    f"could not load task {name!r} ({detail}). Check its YAML and data files; relative data_files "
                    "are read from the working directory"
                ) from e
            where = f"offline mode was on: {offline_reason}" if offline_reason else "the hub could not provide it"
            raise ZeroShotError(
                f"could not load the data of task {name!r} ({where}; {detail}). Hub-backed tasks such as "
                "arc_easy, piqa or hellaswag need network access (or a cached copy); offline, use a local task "
                "definition (a YAML with dataset_path: json and local data_files, passed with include_path=; see "
                f"docs/zeroshot.md) or svdkit's own offline tasks ({', '.join(SHIPPED_TASKS)})"
            ) from e
        finally:
            task_log.removeFilter(quiet)
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    return merged


# --------------------------------------------------------------------------------------------- results
def _number(value) -> float | None:
    """A finite float, else None (lm-eval reports a missing stderr as 'N/A', and n=1 gives NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metrics(raw: dict) -> dict[str, float | None]:
    """`acc`, `acc_norm` and their stderr from lm-eval's `'acc,none'`-style keys (first filter only)."""
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        metric, _filter = key.split(",", 1)
        if metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and metric not in out:
            out[metric] = _number(value)
    return out


def _summarise(results: dict, loaded: dict) -> dict:
    tasks = {}
    for name in sorted(loaded["tasks"]):
        raw = results["results"].get(name, {})
        entry = _metrics(raw)
        n = results.get("n-samples", {}).get(name, {})
        entry["samples"] = n.get("effective")
        entry["samples_total"] = n.get("original")
        tasks[name] = entry
    accs = [t["acc"] for t in tasks.values() if t.get("acc") is not None]
    groups = {name: _metrics(raw) for name, raw in sorted(results.get("groups", {}).items())}
    out = {"tasks": tasks, "average_acc": sum(accs) / len(accs) if accs else None}
    if groups:
        out["groups"] = groups
    return out


# --------------------------------------------------------------------------------------------- API
def _as_lm(model, tokenizer, batch_size: int):
    """An lm-eval `LM`: `model` itself if it already is one, else `HFLM` around the in-memory HF model."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    if tokenizer is None:
        raise ZeroShotError("zero-shot evaluation of a Hugging Face model needs its tokenizer")
    from lm_eval.models.huggingface import HFLM

    try:  # HFLM sets a pad token on the tokenizer it gets; keep the caller's untouched
        tokenizer = copy.deepcopy(tokenizer)
    except Exception:  # pragma: no cover - every transformers tokenizer deep-copies today
        log.debug("tokenizer could not be copied; lm-eval may set its pad token")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _task_names(tasks: str | Sequence[str], limit: int | None, batch_size: int) -> list[str]:
    """The task names (a comma-separated string or a sequence), with the options checked."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise ZeroShotError("no tasks given")
    if limit is not None and limit < 1:
        raise ZeroShotError(f"limit must be a positive number of items per task (got {limit})")
    if batch_size < 1:
        raise ZeroShotError(f"batch_size must be at least 1 (got {batch_size})")
    return names


def check_tasks(tasks: str | Sequence[str], include_path=None) -> list[str]:
    """The task names, once lm-eval is known to be installed and to know every one of them: lets a caller that
    evaluates only after a long compression fail before it starts."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ZeroShotError("zero-shot evaluation needs lm-evaluation-harness: pip install lm-eval") from e
    names = _task_names(tasks, None, 1)
    _resolve_tasks(names, _task_paths(include_path))
    return names


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = (DEFAULT_TASK,),
    limit: int | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    offline: bool | None = None,
) -> dict:
    """Zero-shot accuracy of `model` on lm-eval `tasks`; returns a JSON-ready dict.

    `model` is an in-memory Hugging Face causal LM (dense or with `LowRankLinear` layers) with its
    `tokenizer`, or any `lm_eval.api.model.LM` (then `tokenizer` is ignored). `tasks` are names (or a
    comma-separated string) from lm-eval's registry, svdkit's task folder or `include_path` (a folder or
    folders of task YAML files), or paths to task YAML files. `limit` evaluates only the first `limit`
    items of each task. `offline=None` switches the hub to offline mode when `HF_HUB_OFFLINE` is set or
    the hub is unreachable, so missing hub data fails fast; `True`/`False` force it.

    Returns `{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples",
    "samples_total"}}, "average_acc", "limit", "num_fewshot", "seconds", "lm_eval_version"}` (plus
    `"groups"` when a group was asked for); `acc_norm` only for tasks that report it, and a missing
    stderr is None.
    """
    try:
        import lm_eval
        from lm_eval import evaluator
    except ImportError as e:
        raise ZeroShotError("zero-shot evaluation needs lm-evaluation-harness: pip install lm-eval") from e
    names = _task_names(tasks, limit, batch_size)

    start = time.perf_counter()
    manager = _resolve_tasks(names, _task_paths(include_path))
    loaded = _load_tasks(manager, names, _offline_reason(offline, names))
    for task in loaded["tasks"].values():  # zero-shot unless a task's YAML fixes its own shot count
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)

    lm = _as_lm(model, tokenizer, batch_size)
    was_training = getattr(model, "training", None)
    log.info("zero-shot evaluation of %s (limit %s)", ", ".join(sorted(loaded["tasks"])), limit)
    try:
        results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
    finally:
        if was_training:  # HFLM switches the model to eval mode
            model.train()
    if results is None:  # pragma: no cover - only non-zero ranks of a distributed run get None
        raise ZeroShotError("lm-eval returned no results (not rank 0 of a distributed run?)")

    out = _summarise(results, loaded)
    num_fewshot = sorted({int(v) for v in results.get("n-shot", {}).values() if isinstance(v, int)})
    out.update(
        limit=limit,
        num_fewshot=num_fewshot[0] if len(num_fewshot) == 1 else num_fewshot,
        seconds=round(time.perf_counter() - start, 2),
        lm_eval_version=getattr(lm_eval, "__version__", None),
    )
    return out

"""Keeping secrets out of what a run writes and logs.

`redact(x)` returns `x` (a string, or dicts/lists/tuples of them, keys included) with
  - credentials in URLs replaced: `scheme://user:password@host/...` -> `scheme://***@host/...`;
  - the values of the query parameters in REDACTED_QUERY_PARAMS replaced: `?sig=abc&x=1` -> `?sig=***&x=1`
    (pre-signed S3/GCS URLs, Azure SAS tokens, `?token=` style API keys);
  - the value of every secret environment variable (is_secret_name) replaced by `***`, wherever it
    appears (a config that resolved `${oc.env:HF_TOKEN}` into some key).
It is applied wherever a config or a list of sources is written: RUN_DIR/config.yaml (which the training
ranks read), the W&B run's config, the source names in metrics, stats.json and manifest.json, and
the configs `xlp submit` saves (which keep `${oc.env:NAME}` for values that came from the environment).

Secret environment variables (is_secret: WANDB_API_KEY, HF_TOKEN, any name ending in _TOKEN, _KEY,
_SECRET, _PASSWORD, _PASSWD or _CREDENTIALS, and any variable whose value holds a credentialed URL)
never go into a Ray runtime environment (Ray's agents log those): see pipeline/cluster/launch.py RayRanks for how the Ray Train workers get them.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf

MASK = "***"

SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "RAY_AUTH_TOKEN")
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD", "_PASSWD", "_CREDENTIALS")

# Query parameters whose value is a credential (compared case-insensitively).
REDACTED_QUERY_PARAMS = (
    "token", "access_token", "refresh_token", "id_token", "auth", "api_key", "apikey", "key", "password",
    "secret", "client_secret", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "x-goog-signature", "x-goog-credential", "awsaccesskeyid",
)

# scheme://user:password@  (the user part may be empty: scheme://:password@)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s:'\"]*:[^/@\s'\"]*@")
_QUERY = re.compile(r"(?P<head>[?&;](?:%s)=)[^&#\s'\"]*" % "|".join(re.escape(p) for p in REDACTED_QUERY_PARAMS),
                    re.IGNORECASE)
# Values shorter than this are not searched for (a 3-character "secret" would mask half the text).
_MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    """An environment variable treated as a secret (see the module docstring)."""
    upper = name.upper()
    return upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)


def is_secret(name: str, value: str) -> bool:
    """A variable to keep out of logged channels: a secret name, or a value holding a credential."""
    return is_secret_name(name) or redact_text(value, {}) != value


def secret_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The secret variables of `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if is_secret_name(k) and v}


# What a Ray task or worker on a cluster gets from the process that started it, when that process is not
# its parent (an `xlp run` driver connected to a running cluster; Ray Train's workers): the variables our
# code and its libraries read, by prefix. The secret ones among them never go into a Ray runtime
# environment (Ray's agents log it): they travel as a Ray object that the task reads into its environment.
FORWARDED_ENV_PREFIXES = ("XLP_", "WANDB_", "TRITON_", "DS_", "DEEPSPEED_", "NCCL_", "TORCH_", "HF_", "OMP_")


def forwarded_env(env: Optional[Mapping[str, str]] = None) -> tuple[dict[str, str], dict[str, str]]:
    """The variables of `env` (default: this process's) that a Ray task started on a cluster should see,
    split into (plain, secret): the plain ones for its runtime environment, the secret ones to pass as an
    object."""
    env = os.environ if env is None else env
    passed = {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    secret = {k: passed.pop(k) for k in list(passed) if is_secret(k, passed[k])}
    return passed, secret


def _secret_values(env: Optional[Mapping[str, str]]) -> list[str]:
    values = {v for v in secret_env(env).values() if len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: one value may contain another


def redact_urls(text: str) -> str:
    """`text` with URL credentials and credential query parameters masked (no environment lookup: cheap
    enough for every file of a listing)."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + MASK + "@", text)
    return _QUERY.sub(lambda m: m.group("head") + MASK, text)


def redact_text(text: str, env: Optional[Mapping[str, str]] = None) -> str:
    text = redact_urls(text)
    for value in _secret_values(env):
        text = text.replace(value, MASK)
    return text


def redact(obj: Any, env: Optional[Mapping[str, str]] = None) -> Any:
    """`obj` with credentials masked (strings, and dicts/lists/tuples of them; other values as they are)."""
    if isinstance(obj, str):
        return redact_text(obj, env)
    if isinstance(obj, dict):
        return {redact(k, env): redact(v, env) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, env) for v in obj)
    return obj


def redact_config_yaml(cfg: Any) -> str:
    """A resolved OmegaConf config as YAML, redacted (for RUN_DIR/config.yaml and the like)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))


def env_references(obj: Any, env: Optional[Mapping[str, str]] = None) -> Any:
    """`obj` with every occurrence of a secret environment value (a secret name, or a value holding a
    credentialed URL) written as `${oc.env:NAME}`: what `xlp submit` saves, so that the job resolves it
    from its own environment and the file holds no secret."""
    env = os.environ if env is None else env
    found = [(name, value) for name, value in env.items()
             if len(value) >= _MIN_SECRET_LEN and "${" not in value
             and (is_secret_name(name) or redact_text(value, {}) != value)]
    found.sort(key=lambda item: len(item[1]), reverse=True)

    def fix(x: Any) -> Any:
        if isinstance(x, str):
            for name, value in found:
                x = x.replace(value, "${oc.env:%s}" % name)
            return x
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fix(v) for v in x)
        return x

    return fix(obj)


def secret_keys(obj: Any, env: Optional[Mapping[str, str]] = None, prefix: str = "") -> list[str]:
    """Dotted keys of `obj` whose (string) value holds a credential or a secret environment value."""
    if isinstance(obj, str):
        return [prefix or "(value)"] if redact_text(obj, env) != obj else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    keys: list[str] = []
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(obj, (list, tuple)) else f"{prefix}.{k}" if prefix else str(k)
        keys += secret_keys(v, env, key)
    return keys

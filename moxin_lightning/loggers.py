"""The default experiment logger: Weights & Biases, online when an API key is configured, offline otherwise.

A run on a laptop or a cluster node without W&B credentials must neither stop at a login prompt nor wait on
the network: it logs offline under `save_dir/wandb/offline-run-*`, and `wandb sync` uploads it later. A
machine with a key logs online with no flag to set. The key is looked for where wandb itself looks (the
WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE variables, a netrc entry for the W&B host, the api_key of wandb's
settings file), without any network call. `offline: true/false`, or WANDB_MODE in the environment, decides
instead. Lightning's `CSVLogger` (`class_path: lightning.pytorch.loggers.CSVLogger`) is the alternative that
needs no wandb at all.

YAML:
    trainer:
      logger:
        class_path: moxin_lightning.loggers.WandbLogger
        init_args: {project: moxin, save_dir: runs}
"""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

DEFAULT_HOST = "https://api.wandb.ai"
# WANDB_MODE values wandb accepts, and what they mean here.
_ENV_MODES = {
    "online": "online",
    "run": "online",
    "shared": "shared",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def api_key_configured(environ: dict[str, str] | None = None) -> bool:
    """Whether wandb would find credentials for its host: env variables, netrc, or its settings file. No network."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    return _netrc_has_password(host, env) or _settings_file_has_key(env)


def choose_mode(
    offline: bool | None, environ: dict[str, str] | None = None
) -> Literal["online", "offline", "disabled", "shared"]:
    """The wandb mode: `offline` when given, else WANDB_MODE when set, else online exactly when a key is configured."""
    env = os.environ if environ is None else environ
    if offline is not None:
        return "offline" if offline else "online"
    if env.get("WANDB_MODE"):
        mode = env["WANDB_MODE"].lower()
        if mode not in _ENV_MODES:
            raise ValueError(
                f"WANDB_MODE={env['WANDB_MODE']!r} is not a wandb mode; use online, offline, disabled or shared"
            )
        return _ENV_MODES[mode]
    return "online" if api_key_configured(env) else "offline"


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, with `offline` decided from the machine's credentials unless given.

    Args:
        project: W&B project (env WANDB_PROJECT, else 'moxin').
        name: display name of the run.
        save_dir: the folder under which wandb writes `wandb/` (offline runs included).
        version: run id, to resume a W&B run.
        offline: True/False forces the mode; None (default): WANDB_MODE if set, else online iff a key is found.
        log_model: upload checkpoints as artifacts (needs online mode).
        prefix: put before every metric name.
        entity, group, tags, notes, job_type: passed to `wandb.init` (named here so YAML can set them).
        **kwargs: any other `wandb.init` argument (from Python; YAML accepts only the named ones).
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        save_dir: str | Path = ".",
        version: str | None = None,
        offline: bool | None = None,
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.mode = choose_mode(offline)
        if log_model and self.mode in ("offline", "disabled"):
            raise ValueError(
                f"log_model={log_model!r} uploads checkpoints but W&B runs {self.mode} here; "
                "configure an API key (wandb login / WANDB_API_KEY) or set log_model: false"
            )
        # The mode goes to wandb.init; Lightning's own `offline` would set WANDB_MODE for the whole process.
        super().__init__(
            name=name,
            save_dir=os.fspath(save_dir),
            version=version,
            offline=False,
            project=project or os.environ.get("WANDB_PROJECT", "moxin"),
            log_model=log_model,
            prefix=prefix,
            entity=entity,
            group=group,
            tags=tags,
            notes=notes,
            job_type=job_type,
            **{**kwargs, "mode": self.mode},
        )

    @property
    def experiment(self) -> Any:
        """The wandb run, started on first use. Its folder is made only then (wandb would fall back to a temp dir
        if it were missing), so a run refused at a config check leaves no folder behind."""
        if self._experiment is None:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        return super().experiment


def _netrc_has_password(host: str, env: dict[str, str]) -> bool:
    """A password for `host` in the netrc file wandb reads (NETRC, else ~/.netrc, else ~/_netrc)."""
    home = Path(env.get("HOME") or Path.home())
    candidates = [Path(env["NETRC"]).expanduser()] if env.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in candidates:
        if path.is_file():
            try:
                entry = netrc.netrc(path).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                return False
            return bool(entry and entry[2])
    return False


def _settings_file_has_key(env: dict[str, str]) -> bool:
    """An api_key in wandb's global settings file (WANDB_CONFIG_DIR, else ~/.config/wandb)."""
    home = Path(env.get("HOME") or Path.home())
    folder = Path(env["WANDB_CONFIG_DIR"]) if env.get("WANDB_CONFIG_DIR") else home / ".config" / "wandb"
    settings = configparser.ConfigParser()
    try:
        settings.read(folder / "settings")
    except configparser.Error:
        return False
    return bool(settings.get("default", "api_key", fallback=""))
